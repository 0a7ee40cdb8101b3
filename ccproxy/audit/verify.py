"""`ccproxy audit verify`: check the hash chain of audit files, across rotations, against checkpoints.

What is refused: a line that is not exactly one record in canonical form (a key given twice, other
spacing, bytes before or after it), a record whose hash does not match, a gap or a reordering in
`seq`, a chain that ends before the newest checkpoint or starts after it. What is accepted: exact
duplicates (same seq and hash, as a syslog receiver's at-least-once resend leaves them), counted;
and a line cut short by a crash, when the record after it names those very bytes.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import attrs
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ccproxy.audit import _checkpoint
from ccproxy.audit._record import GENESIS, NotCanonical, parse_line, record_hash

# How far back an exact duplicate may reach (the syslog output resends at most 10,000 records).
_DUPLICATE_WINDOW = 20_000
# Reads a line as the trail wrote it (decrypting it if the files are encrypted); raises NotCanonical.
Decode = Callable[[bytes], dict[str, Any]]


@attrs.frozen
class Entry:
    file: str
    line: int
    record: dict[str, Any] | None  # None: the line is not a record
    raw: bytes = b""
    fault: str = ""


@attrs.frozen
class Report:
    ok: bool
    message: str
    records: int = 0
    duplicates: int = 0


def _entries(path: str, received: bool, decode: Decode) -> Iterator[Entry]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            body = raw[:-1] if raw.endswith(b"\n") else raw
            if received:  # a syslog receiver's file: its own header comes before the JSON
                if not body.strip():
                    continue
                start = body.find(b"{")
                body = body[start:] if start >= 0 else body
            try:
                yield Entry(path, number, decode(body), body)
            except NotCanonical as e:
                yield Entry(path, number, None, body, str(e))


def _first_seq(entries: list[Entry]) -> float:
    for entry in entries:
        if entry.record is not None and isinstance(entry.record.get("seq"), int):
            return float(entry.record["seq"])
    return float("inf")


def _seals(record: dict[str, Any] | None, raw: bytes) -> bool:
    """Is `record` the trail's note about this cut-short line (found and sealed at a restart)?"""
    return (record is not None and record.get("event") == "audit_file_damaged"
            and record.get("partial_bytes") == len(raw)
            and record.get("partial_sha256") == hashlib.sha256(raw).hexdigest())


def verify(paths: Sequence[str], key: bytes | None = None, public_key: Ed25519PublicKey | None = None,
           received: bool = False, decode: Decode = parse_line) -> Report:
    """The first fault found, or a summary if there is none.

    Files are put in chain order by their first sequence number, so rotated files can be given
    in any order (`audit.log*`). Checkpoints are taken from every file given: a checkpoint file
    (`audit.log.checkpoints`), or a syslog receiver's file that holds them among the records.
    """
    files: list[list[Entry]] = []
    checkpoints: list[tuple[Entry, dict[str, Any]]] = []
    for path in paths:
        kept = []
        for entry in _entries(path, received, decode):
            if entry.record is not None and _checkpoint.is_checkpoint(entry.record):
                checkpoints.append((entry, entry.record))
            else:
                kept.append(entry)
        if kept:
            files.append(kept)
    files.sort(key=_first_seq)
    entries = [e for f in files for e in f]
    if not any(e.record is not None for e in entries):
        bad = next((e for e in entries if e.fault), None)
        if bad is not None:
            return Report(False, f"{bad.file}:{bad.line}: not an audit record ({bad.fault})")
        return Report(False, "no audit records found")
    stream = _stream(entries)
    marks, fault = _checkpoints(checkpoints, stream, public_key, key)
    if fault:
        return Report(False, fault)
    wanted = {cp["seq"]: cp for _, cp in marks}
    recent: dict[int, str] = {}
    order: deque[int] = deque()
    expected_seq: int | None = None
    prev_hash: str | None = None
    first: dict[str, Any] | None = None
    last_where = ""
    count = duplicates = damaged = 0
    for i, entry in enumerate(entries):
        where = f"{entry.file}:{entry.line}"
        record = entry.record
        if record is None or not isinstance(record.get("seq"), int) or not isinstance(record.get("hash"), str):
            following = next((e.record for e in entries[i + 1:] if e.record is not None), None)
            if record is None and _seals(following, entry.raw):
                damaged += 1
                continue
            why = entry.fault or "no seq or hash"
            return Report(False, f"{where}: not an audit record ({why}): changed or corrupted", count, duplicates)
        seq = record["seq"]
        if expected_seq is not None and seq < expected_seq and recent.get(seq) == record["hash"]:
            if record_hash(record, key) == record["hash"]:
                duplicates += 1  # the same record again: a receiver's at-least-once delivery
                continue
        if expected_seq is not None and seq != expected_seq:
            return Report(False, _order_fault(where, seq, expected_seq, recent, entries[i:]), count, duplicates)
        if prev_hash is not None and record.get("prev") != prev_hash:
            return Report(False, f"{where}: record seq {seq} does not follow the previous record "
                                 "(a record before it was changed or removed)", count, duplicates)
        if record_hash(record, key) != record["hash"]:
            hint = "" if key else " (or it was sealed with an HMAC key: set it in the environment)"
            return Report(False, f"{where}: record seq {seq} was changed: its hash does not match{hint}",
                          count, duplicates)
        cp = wanted.get(seq)
        if cp is not None and cp["hash"] != record["hash"]:
            return Report(False, f"{where}: record seq {seq} is not the one the checkpoint of {cp['time']} "
                                 "saw: the chain was rewritten from there", count, duplicates)
        if first is None:
            first = record
        count += 1
        recent[seq] = record["hash"]
        order.append(seq)
        if len(order) > _DUPLICATE_WINDOW:
            recent.pop(order.popleft(), None)
        expected_seq, prev_hash, last_where = seq + 1, record["hash"], entry.file
    assert first is not None and expected_seq is not None
    last_seq = expected_seq - 1
    if marks:
        newest_entry, newest = max(marks, key=lambda m: m[1]["seq"])
        if newest["seq"] > last_seq:
            return Report(False, f"records after seq {last_seq} are missing: the checkpoint of {newest['time']} "
                                 f"({newest_entry.file}:{newest_entry.line}) saw seq {newest['seq']}; "
                                 f"{last_where} is older than the last checkpoint", count, duplicates)
        start = max(m[1]["first"] for m in marks if m[1]["seq"] == newest["seq"])
        if first["seq"] > start:
            return Report(False, f"records seq {start} to {first['seq'] - 1} are missing: the checkpoint of "
                                 f"{newest['time']} still counted them (the oldest files were removed)",
                          count, duplicates)
    origin = "the start of the chain" if first.get("prev") == GENESIS else f"seq {first.get('seq')}"
    notes = []
    if duplicates:
        notes.append(f"{duplicates} exact duplicates ignored")
    if damaged:
        notes.append(f"{damaged} lines cut short by a crash, sealed by the record after them")
    notes.append(_checkpoint_note(marks, public_key, key))
    return Report(True, f"OK: {count} records, seq {first.get('seq')} to {last_seq}, chain intact from {origin}; "
                        + "; ".join(notes), count, duplicates)


def _stream(entries: list[Entry]) -> str:
    """Access chains hold http_request records (and at most a few notices about their files)."""
    found = any(e.record is not None and e.record.get("event") == "http_request" for e in entries)
    return "access" if found else "audit"


def _checkpoints(found: list[tuple[Entry, dict[str, Any]]], stream: str, public: Ed25519PublicKey | None,
                 key: bytes | None) -> tuple[list[tuple[Entry, dict[str, Any]]], str]:
    marks = []
    for entry, cp in found:
        where = f"{entry.file}:{entry.line}"
        if not _checkpoint.well_formed(cp):
            return [], f"{where}: not a well-formed checkpoint"
        if cp["stream"] != stream:
            continue
        if _checkpoint.check(cp, public, key) is False:
            return [], f"{where}: checkpoint seq {cp['seq']} has a bad signature: forged or changed"
        marks.append((entry, cp))
    return marks, ""


def _checkpoint_note(marks: list[tuple[Entry, dict[str, Any]]], public: Ed25519PublicKey | None,
                     key: bytes | None) -> str:
    if not marks:
        return "no checkpoint given: records removed from the end or the start cannot be seen"
    newest = max(marks, key=lambda m: m[1]["seq"])[1]
    checked = _checkpoint.check(newest, public, key)
    how = {True: f"signature ({newest['alg']}) verified", None: f"signature ({newest['alg']}) not checked: "
           "give --public-key" if newest["alg"] == _checkpoint.ED25519 else "signature not checked: set the HMAC key"}
    return f"{len(marks)} checkpoints agree, the newest at seq {newest['seq']} ({newest['time']}, {how[checked]})"


def _order_fault(where: str, seq: int, expected: int, recent: dict[int, str], rest: list[Entry]) -> str:
    later = {e.record.get("seq") for e in rest if e.record is not None}
    if seq in recent:
        return f"{where}: record seq {seq} appears again with different content (expected seq {expected})"
    if seq < expected or expected in later:
        return f"{where}: record seq {seq} is out of order (expected seq {expected}): records were reordered"
    missing = f"seq {expected}" if seq == expected + 1 else f"seq {expected} to {seq - 1}"
    return f"{where}: {missing} removed (the next record found is seq {seq})"
