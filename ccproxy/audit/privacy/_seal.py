"""Sealing a record's personal fields with its subject's key, and opening them again for an export.

The subject of a record is its `user_id`, else its `api_key_id`, else its `ip_address`. Its
personal fields are set to null and carried, as one AES-256-GCM ciphertext, in `sealed`, beside
`subject` (the keyed digest of the subject). The chain's hash covers the ciphertext, so destroying
the key later erases the data without breaking the chain.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ccproxy.audit._record import ENCRYPTED, NotCanonical, _dumps, parse_line
from ccproxy.audit.privacy._keys import KeyStore

# Fields that name or locate a person, wherever an event puts them.
PERSONAL = ("ip_address", "user_id", "api_key_id", "client_ip", "ip", "peer", "remote_ip", "source_ip",
            "key_id", "user", "username", "sub", "email", "client_id", "name")
# Fields that describe the event, never a person: left in clear.
_STRUCTURE = frozenset({"timestamp", "event", "severity", "request_id", "seq", "prev", "hash", "method", "status",
                        "latency_ms", "subject", "sealed", "stream"})
SUBJECT_ORDER = ("user_id", "api_key_id", "ip_address")


def subject_of(record: dict[str, Any]) -> tuple[str, str] | None:
    for field in SUBJECT_ORDER:
        value = record.get(field)
        if value not in (None, ""):
            return field, str(value)
    return None


class Sealer:
    def __init__(self, store: KeyStore) -> None:
        self.store = store
        self._aead: dict[str, AESGCM] = {}
        self._sids: dict[tuple[str, str], str] = {}

    def forget_cached(self) -> None:
        self._aead.clear()

    def seal(self, record: dict[str, Any]) -> None:
        """In place: personal fields to null, their values sealed under the record's subject."""
        subject = subject_of(record)
        if subject is None:
            return
        sid = self._sids.get(subject)
        if sid is None:
            if len(self._sids) > 100_000:
                self._sids.clear()
            sid = self._sids[subject] = self.store.subject_id(*subject)
        aead = self._aead.get(sid)
        if aead is None:
            subject_key = self.store.subject_key(sid, sync=False)
            assert subject_key is not None
            if len(self._aead) > 100_000:
                self._aead.clear()
            aead = self._aead[sid] = AESGCM(subject_key)
        personal = {k: record[k] for k in PERSONAL if record.get(k) is not None}
        values = [v for v in map(str, personal.values()) if len(v) >= 3]
        for field, value in record.items():  # free text that repeats a personal value is personal too
            if field in _STRUCTURE or field in personal or not isinstance(value, str | dict | list):
                continue
            text = value if isinstance(value, str) else _dumps(value).decode()
            if any(v in text for v in values):
                personal[field] = value
        for field in personal:
            record[field] = None
        nonce = os.urandom(12)
        data = _dumps(personal)
        record["subject"] = sid
        record["sealed"] = base64.b64encode(nonce + aead.encrypt(nonce, data, sid.encode())).decode()


def open_sealed(record: dict[str, Any], key: bytes) -> dict[str, Any] | None:
    """The record with its personal fields back, or None if `key` does not open it."""
    try:
        blob = base64.b64decode(str(record["sealed"]))
        personal = json.loads(AESGCM(key).decrypt(blob[:12], blob[12:], str(record["subject"]).encode()))
    except (InvalidTag, ValueError, KeyError):
        return None
    out = {k: v for k, v in record.items() if k != "sealed"}
    out.update(personal)
    return out


class AtRest:
    """Whole-record encryption of file lines and spool entries: `e1:` + base64(nonce + AES-256-GCM).

    A line without the prefix is read as it is (written before encryption was turned on): the
    chain, not the cipher, is what proves a line belongs.
    """

    PREFIX = ENCRYPTED

    def __init__(self, key: bytes) -> None:
        self.aead = AESGCM(key)

    def seal(self, line: bytes) -> bytes:
        """A line (with or without its newline) in, the encrypted line with a newline out."""
        nonce = os.urandom(12)
        body = line[:-1] if line.endswith(b"\n") else line
        return self.PREFIX + base64.b64encode(nonce + self.aead.encrypt(nonce, body, b"ccproxy at rest")) + b"\n"

    def open(self, raw: bytes) -> bytes:
        if not raw.startswith(self.PREFIX):
            return raw
        try:
            blob = base64.b64decode(raw[len(self.PREFIX):], validate=True)
            return self.aead.decrypt(blob[:12], blob[12:], b"ccproxy at rest")
        except (InvalidTag, ValueError):
            raise NotCanonical("cannot be decrypted: changed, or encrypted with another key") from None

    def decode(self, raw: bytes) -> dict[str, Any]:
        return parse_line(self.open(raw))


# Reading without the key: parse_line says what an encrypted line is.
plain_decode = parse_line
