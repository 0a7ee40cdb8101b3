"""The file output on an injected clock: batching, daily and size rotation, retention, resuming the chain."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ccproxy import events
from ccproxy.audit._file import rotated_files
from tests.support.audit import BASE_TIME, Harness

DAY = 86400.0


def _file(tmp: Path, **extra: object) -> dict[str, object]:
    return {"outputs": [{"type": "file", "path": str(tmp / "audit.log"), **extra}]}


def _seqs(path: Path) -> list[int]:
    return [json.loads(line)["seq"] for line in path.read_text().splitlines()]


def test_writes_are_batched_until_the_flush_interval(tmp_path: Path) -> None:
    h = Harness(tmp_path, _file(tmp_path, flush_interval="500ms"))
    try:
        for _ in range(5):
            events.emit("invalid_request", "notice")
        assert h.path.read_text() == ""  # nothing written on the emitting call itself
        h.clock.advance(0.5)
        assert _seqs(h.path) == [1, 2, 3, 4, 5]
    finally:
        h.stop()


def test_daily_rotation_names_old_files_by_date(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    try:
        events.emit("invalid_request", "notice")
        h.clock.advance(DAY)
        events.emit("invalid_request", "notice")
        h.clock.advance(DAY)
        h.clock.advance(3600)  # idle: housekeeping still rotates yesterday's file away
        h.records()
    finally:
        h.stop()
    assert sorted(n for n in os.listdir(tmp_path) if not n.endswith(".checkpoints")) == ["audit.log", "audit.log.2026-01-01", "audit.log.2026-01-02"]
    assert _seqs(tmp_path / "audit.log.2026-01-01") == [1]
    assert _seqs(tmp_path / "audit.log.2026-01-02") == [2]
    assert h.path.read_text() == ""


def test_size_rotation_within_a_day(tmp_path: Path) -> None:
    h = Harness(tmp_path, _file(tmp_path, max_size="4KiB"))
    try:
        for i in range(40):
            events.emit("invalid_request", "notice", padding="x" * 200, n=i)
            h.clock.advance(0.3)
        h.records()
    finally:
        h.stop()
    files = [p for _, p in rotated_files(str(h.path))] + [str(h.path)]
    assert len(files) >= 3
    assert all(os.path.getsize(p) <= 4096 for p in files)
    assert [s for p in files for s in _seqs(Path(p))] == list(range(1, 41))


def test_retention_removes_files_older_than_it(tmp_path: Path) -> None:
    h = Harness(tmp_path, _file(tmp_path, retention="2d"))
    try:
        for _ in range(5):
            events.emit("invalid_request", "notice")
            h.clock.advance(DAY)
        events.emit("invalid_request", "notice")
        h.records()
    finally:
        h.stop()
    # Now is 2026-01-06: files whose whole day ended more than two days ago are gone.
    assert sorted(n for n in os.listdir(tmp_path) if not n.endswith(".checkpoints")) == ["audit.log", "audit.log.2026-01-04", "audit.log.2026-01-05"]


def test_gdpr_data_retention_caps_the_file_retention(tmp_path: Path) -> None:
    h = Harness(tmp_path, _file(tmp_path, retention="90d"), privacy={"gdpr": {"data_retention": "1d"}})
    try:
        for _ in range(4):
            events.emit("invalid_request", "notice")
            h.clock.advance(DAY)
        h.clock.advance(3600)
    finally:
        h.stop()
    assert sorted(n for n in os.listdir(tmp_path) if not n.endswith(".checkpoints")) == ["audit.log", "audit.log.2026-01-04"]


def test_a_restart_continues_the_chain_and_rotates_a_stale_file(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    events.emit("invalid_request", "notice")
    events.emit("invalid_request", "notice")
    last = h.records()[-1]
    h.stop()
    h2 = Harness(tmp_path, start=BASE_TIME + DAY)  # the new process starts on a later day
    try:
        assert _seqs(tmp_path / "audit.log.2026-01-01") == [1, 2]
        events.emit("invalid_request", "notice")
        [record] = h2.records()
    finally:
        h2.stop()
    assert record["seq"] == 3 and record["prev"] == last["hash"]
    assert record["timestamp"].startswith("2026-01-02")


def test_a_failed_write_is_counted_and_reported_to_the_other_outputs(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.log", tmp_path / "bad.log"
    h = Harness(tmp_path, {"outputs": [{"type": "file", "path": str(bad)}, {"type": "file", "path": str(good)}]})
    try:
        [sink] = [s for (spec, _), s in h.trail.sinks.items() if spec.path == str(bad)]
        os.close(sink.fd)  # the disk goes away under the output
        sink.fd = os.open("/dev/full", os.O_WRONLY)
        events.emit("invalid_request", "notice")
        events.emit("invalid_request", "notice")
        h.clock.advance(1.0)
        assert sink.losses.lost == 2
        h.clock.advance(10.0)
        records = h.records(good)
    finally:
        h.stop()
    lost = [r for r in records if r["event"] == "audit_records_lost"]
    assert len(lost) == 1 and lost[0]["count"] == 2 and lost[0]["output"] == f"file {bad}"
