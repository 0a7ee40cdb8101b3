"""Records: one JSON object per event, chained by sequence number and hash."""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any

from ccproxy.audit._scrub import IP_FIELDS, Anonymizer, Scrubber

GENESIS = "0" * 64
BASE_FIELDS = ("timestamp", "event", "severity", "request_id", "ip_address", "api_key_id", "user_id", "reason")
# twisted.logger's own keys and ours that say how to log, not what happened.
_SKIP = frozenset({"ccproxy_event", "severity", "log_logger", "log_source", "log_format", "log_level",
                   "log_namespace", "log_time", "log_failure", "log_text", "log_io", "log_trace",
                   "log_system", "log_flattened", "format", "message", "isError", "system", "time"})
_MAX_DEPTH = 4
_PLAIN = (int, float, bool)


_second: list[Any] = [None, ""]  # the last whole second formatted: most records share it


def rfc3339(seconds: float) -> str:
    whole = int(seconds)
    if _second[0] != whole:
        moment = datetime.datetime.fromtimestamp(whole, datetime.UTC)
        _second[0], _second[1] = whole, moment.strftime("%Y-%m-%dT%H:%M:%S.")
    return f"{_second[1]}{int((seconds - whole) * 1000):03d}Z"


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)  # built once: json.dumps builds one per call


def _dumps(value: Any) -> bytes:
    return _ENCODER.encode(value).encode()


ENCRYPTED = b"e1:"  # the prefix of a line encrypted at rest (ccproxy.audit.privacy.AtRest)


class NotCanonical(ValueError):
    """A line that is not exactly one record in the form the trail writes."""


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise NotCanonical(f"key {key!r} appears twice")
        out[key] = value
    return out


_DECODER = json.JSONDecoder(object_pairs_hook=_unique)


def parse_line(raw: bytes) -> dict[str, Any]:
    """The record on one line (without its newline), only if the line is its canonical encoding.

    A JSON parser accepts many spellings of one object (spaces, escapes, a key given twice, where
    the last one wins); the hash covers only the canonical one, so any other spelling could show a
    reader something the chain never sealed. Refusing every other spelling closes that gap.
    """
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise NotCanonical("holds bytes outside ASCII") from None
    try:
        value = _DECODER.decode(text)
    except NotCanonical:
        raise
    except ValueError:
        if raw.startswith(ENCRYPTED):
            raise NotCanonical("encrypted at rest (privacy.hipaa.encryption_at_rest): give --config so that the "
                               "key store's file key can be read") from None
        raise NotCanonical("not a JSON object (bytes before or after the record, or a cut line)") from None
    if not isinstance(value, dict):
        raise NotCanonical("not a JSON object")
    if _dumps(value) != raw:
        raise NotCanonical("not in the canonical form the trail writes (spacing, escapes or number format)")
    return value


def canonical(record: Mapping[str, Any]) -> bytes:
    """The bytes a record's hash covers: every field but `hash`, in the record's order, no spaces.

    That is exactly the written line up to the hash, so sealing encodes once; json.loads keeps the
    order and floats round-trip, so a verifier re-encoding a parsed record gets the same bytes.
    """
    return _dumps({k: v for k, v in record.items() if k != "hash"})


def _mac(data: bytes, key: bytes | None) -> str:
    if key:
        return hmac.new(key, data, hashlib.sha256).hexdigest()
    return hashlib.sha256(data).hexdigest()


def record_hash(record: Mapping[str, Any], key: bytes | None) -> str:
    return _mac(canonical(record), key)


class Chain:
    """Numbers records and links each one to the previous one's hash."""

    def __init__(self, key: bytes | None, seq: int = 0, last_hash: str = GENESIS) -> None:
        self.key = key
        self.seq = seq
        self.last_hash = last_hash

    def seal(self, record: dict[str, Any]) -> bytes:
        """Number and hash `record` (adding seq, prev, hash); returns its line, ready to write."""
        self.seq += 1
        record.pop("hash", None)
        record["seq"] = self.seq
        record["prev"] = self.last_hash
        body = _dumps(record)
        record["hash"] = self.last_hash = _mac(body, self.key)
        return body[:-1] + b',"hash":"' + self.last_hash.encode() + b'"}\n'


def encode(record: Mapping[str, Any]) -> bytes:
    """One line of ASCII JSON (non-ASCII escaped, so syslog and files never see a broken byte)."""
    return _dumps(record) + b"\n"


class RecordBuilder:
    """Turns twisted.logger events into clean record dicts (no secret, anonymised if asked)."""

    def __init__(self, scrubber: Scrubber, anonymizer: Anonymizer | None) -> None:
        self.scrubber = scrubber
        self.anonymizer = anonymizer

    def security(self, event: Mapping[str, Any], now: float) -> dict[str, Any]:
        record: dict[str, Any] = {name: None for name in BASE_FIELDS}
        record["timestamp"] = rfc3339(now)
        record["event"] = str(event["ccproxy_event"])
        record["severity"] = str(event.get("severity", "info"))
        for key, value in event.items():
            if key in _SKIP or key.startswith("_") or key in ("timestamp", "event", "seq", "prev", "hash"):
                continue
            record[key] = value
        return self._clean(record)

    def access(self, event: Mapping[str, Any], now: float) -> dict[str, Any]:
        # One of these per request: built field by field rather than through the generic _clean.
        value = self._value
        record: dict[str, Any] = {
            "timestamp": rfc3339(now),
            "event": "http_request",
            "severity": "info",
            "request_id": value(_dash_none(event.get("request_id")), 0),
            "ip_address": value(event.get("client_ip"), 0),
            "api_key_id": value(_dash_none(event.get("key_id")), 0),
            "user_id": value(event.get("user_id"), 0),
            "reason": None,
            "method": value(event.get("method"), 0),
            "path": value(event.get("path"), 0),
            "status": value(event.get("status"), 0),
            "latency_ms": round(float(event.get("latency_ms") or 0.0), 3),
        }
        for field in _TOKEN_FIELDS:
            count = event.get(field)
            if isinstance(count, int):
                record[field] = count
        if self.anonymizer is not None and record["ip_address"] is not None:
            record["ip_address"] = self.anonymizer.address(str(record["ip_address"]))
            record["path"] = self._anonymize(record["path"])
        return record

    def _clean(self, record: dict[str, Any]) -> dict[str, Any]:
        for key, value in record.items():
            value = self._value(value, 0)
            if self.anonymizer is not None and value is not None:
                if key in IP_FIELDS and isinstance(value, str):
                    value = self.anonymizer.address(value)
                value = self._anonymize(value)
            record[key] = value
        return record

    def _value(self, value: Any, depth: int) -> Any:
        kind = type(value)
        if kind is str:
            return self.scrubber.text(value)
        if value is None or kind in _PLAIN:
            return value
        if isinstance(value, str):
            return self.scrubber.text(str(value))
        if depth < _MAX_DEPTH and isinstance(value, Mapping):
            return {str(k): self._value(v, depth + 1) for k, v in list(value.items())[:100]}
        if depth < _MAX_DEPTH and isinstance(value, list | tuple | set | frozenset):
            return [self._value(v, depth + 1) for v in list(value)[:100]]
        # Anything else (an exception, a Secret, an object) is logged by its str(), scrubbed.
        return self.scrubber.text(str(value))

    def _anonymize(self, value: Any) -> Any:
        assert self.anonymizer is not None
        if isinstance(value, str):
            return self.anonymizer.text(value)
        if isinstance(value, dict):
            return {k: self._anonymize(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._anonymize(v) for v in value]
        return value


# Token usage of a model reply, when the request had one (ccproxy.content.usage).
_TOKEN_FIELDS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


def _dash_none(value: Any) -> Any:
    return None if value in (None, "-", "") else value
