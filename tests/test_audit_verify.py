"""`ccproxy audit verify`: an intact chain passes; an edited, a deleted and a swapped record are caught."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ccproxy import events
from ccproxy.audit.verify import verify
from ccproxy.cli import main
from tests.support.audit import Harness

DAY = 86400.0
KEY = "verify-test-hmac-key-000000000000"


def _trail(tmp: Path, key: str | None = None) -> list[Path]:
    """Three days of records, so the chain runs across two rotated files and the live one."""
    audit: dict[str, object] = {"outputs": [{"type": "file", "path": str(tmp / "audit.log")}]}
    if key:
        audit["hmac_key"] = key
    h = Harness(tmp, audit)
    try:
        for day in range(3):
            for i in range(4):
                events.emit("authentication_failure", "warning", reason="invalid_api_key", n=day * 4 + i)
            h.clock.advance(DAY)
        events.emit("invalid_request", "notice")
        h.records()
    finally:
        h.stop()
    return sorted(tmp.glob("audit.log*"))


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def test_intact_chain_across_rotated_files_in_any_order(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = _trail(tmp_path)
    assert [p.name for p in files] == ["audit.log", "audit.log.2026-01-01", "audit.log.2026-01-02",
                                       "audit.log.2026-01-03", "audit.log.checkpoints"]
    report = verify([str(p) for p in reversed(files)])
    assert report.ok and report.records == 13, report.message
    assert "checkpoints agree, the newest at seq 13" in report.message
    assert main(["audit", "verify", *map(str, files)]) == 0
    assert "OK: 13 records" in capsys.readouterr().out


def test_an_edited_record_is_caught(tmp_path: Path) -> None:
    files = _trail(tmp_path)
    target = tmp_path / "audit.log.2026-01-02"
    lines = _lines(target)
    record = json.loads(lines[1])
    record["reason"] = "nothing happened"
    lines[1] = json.dumps(record, separators=(",", ":")) + "\n"
    target.write_text("".join(lines))
    report = verify([str(p) for p in files])
    assert not report.ok
    assert report.message.startswith(f"{target}:2: record seq 6 was changed")


def test_a_deleted_record_is_caught(tmp_path: Path) -> None:
    files = _trail(tmp_path)
    target = tmp_path / "audit.log.2026-01-01"
    lines = _lines(target)
    del lines[2]
    target.write_text("".join(lines))
    report = verify([str(p) for p in files])
    assert not report.ok
    assert report.message == f"{target}:3: seq 3 removed (the next record found is seq 4)"


def test_a_deleted_rotated_file_is_caught(tmp_path: Path) -> None:
    files = _trail(tmp_path)
    report = verify([str(p) for p in files if not p.name.endswith("2026-01-02")])
    assert not report.ok and "seq 5 to 8 removed" in report.message


def test_swapped_records_are_caught(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = _trail(tmp_path)
    target = tmp_path / "audit.log.2026-01-03"
    lines = _lines(target)
    lines[0], lines[1] = lines[1], lines[0]
    target.write_text("".join(lines))
    assert main(["audit", "verify", *map(str, files)]) == 1
    err = capsys.readouterr().err
    assert f"{target}:1: record seq 10 is out of order (expected seq 9)" in err


def test_a_rechained_forgery_fails_without_the_hmac_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = _trail(tmp_path, KEY)
    monkeypatch.setenv("CCPROXY_AUDIT_HMAC_KEY", KEY)
    assert main(["audit", "verify", *map(str, files)]) == 0
    # A forger without the key recomputes plain hashes for an edited record: the key catches it.
    from ccproxy.audit._record import record_hash

    target = tmp_path / "audit.log"
    record = json.loads(_lines(target)[0])
    record["event"] = "authentication_success"
    record["hash"] = record_hash(record, None)
    target.write_text(json.dumps(record) + "\n")
    assert main(["audit", "verify", *map(str, files)]) == 1
    monkeypatch.delenv("CCPROXY_AUDIT_HMAC_KEY")
    assert not verify([str(files[1])]).ok  # without the key, even intact sealed records do not verify
