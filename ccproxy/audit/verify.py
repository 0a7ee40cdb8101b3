"""`ccproxy audit verify`: check the hash chain of audit files, across rotations."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import attrs

from ccproxy.audit._record import GENESIS, record_hash


@attrs.frozen
class Entry:
    file: str
    line: int
    record: dict[str, Any] | None  # None: the line is not a JSON record


@attrs.frozen
class Report:
    ok: bool
    message: str
    records: int = 0


def _entries(path: str) -> Iterator[Entry]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            start = raw.find(b"{")  # a syslog receiver's file has a header before the JSON
            try:
                value = json.loads(raw[start:]) if start >= 0 else None
            except ValueError:
                value = None
            yield Entry(path, number, value if isinstance(value, dict) else None)


def _first_seq(entries: list[Entry]) -> float:
    for entry in entries:
        if entry.record is not None and isinstance(entry.record.get("seq"), int):
            return float(entry.record["seq"])
    return float("inf")


def verify(paths: Sequence[str], key: bytes | None = None) -> Report:
    """The first record that was changed, removed or reordered, or a summary if there is none.

    Files are put in chain order by their first sequence number, so rotated files can be given
    in any order (`audit.log*`).
    """
    files = [list(_entries(p)) for p in paths]
    files.sort(key=_first_seq)
    entries = [e for f in files for e in f]
    seen: set[int] = set()
    expected_seq: int | None = None
    prev_hash: str | None = None
    for i, entry in enumerate(entries):
        where = f"{entry.file}:{entry.line}"
        record = entry.record
        if record is None or not isinstance(record.get("seq"), int) or not isinstance(record.get("hash"), str):
            return Report(False, f"{where}: not an audit record (changed or corrupted)", i)
        seq = record["seq"]
        if expected_seq is not None and seq != expected_seq:
            return Report(False, _order_fault(where, seq, expected_seq, seen, entries[i:]), i)
        if record.get("prev") != (prev_hash if prev_hash is not None else record.get("prev")):
            return Report(False, f"{where}: record seq {seq} does not follow the previous record "
                                 "(a record before it was changed or removed)", i)
        if record_hash(record, key) != record["hash"]:
            hint = "" if key else " (or it was sealed with an HMAC key: set it in the environment)"
            return Report(False, f"{where}: record seq {seq} was changed: its hash does not match{hint}", i)
        seen.add(seq)
        expected_seq, prev_hash = seq + 1, record["hash"]
    if expected_seq is None:
        return Report(False, "no audit records found")
    first = entries[0].record or {}
    start = "the start of the chain" if first.get("prev") == GENESIS else f"seq {first.get('seq')}"
    return Report(True, f"OK: {len(entries)} records, seq {first.get('seq')} to {expected_seq - 1}, "
                        f"chain intact from {start}", len(entries))


def _order_fault(where: str, seq: int, expected: int, seen: set[int], rest: list[Entry]) -> str:
    later = {e.record.get("seq") for e in rest if e.record is not None}
    if seq in seen or seq < expected:
        return f"{where}: record seq {seq} is out of order (expected seq {expected}): records were reordered"
    if expected in later:
        return f"{where}: record seq {seq} is out of order (expected seq {expected}): records were reordered"
    missing = f"seq {expected}" if seq == expected + 1 else f"seq {expected} to {seq - 1}"
    return f"{where}: {missing} removed (the next record found is seq {seq})"
