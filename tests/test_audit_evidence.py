"""Evidence that detects removal: canonical records, signed checkpoints, a file replaced under the
daemon, a crash's half-written line, a receiver's duplicates. Each attack of the security review is
played against the trail on a task.Clock, then against `ccproxy audit verify`."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from ccproxy import events
from ccproxy.audit import _checkpoint
from ccproxy.audit.verify import verify
from ccproxy.cli import main
from tests.support.audit import Harness

DAY = 86400.0
KEY = "evidence-test-hmac-key-0000000000"


def _audit(tmp: Path, **extra: Any) -> dict[str, Any]:
    return {"outputs": [{"type": "file", "path": str(tmp / "audit.log")}], **extra}


def _files(tmp: Path) -> list[str]:
    return sorted(str(p) for p in tmp.glob("audit.log*"))


def _run(tmp: Path, days: int = 3, per_day: int = 4, **extra: Any) -> Harness:
    """A trail that wrote `per_day` records on each of `days` days, and is still running."""
    h = Harness(tmp, _audit(tmp, **extra))
    for day in range(days):
        for i in range(per_day):
            events.emit("authentication_failure", "warning", reason="invalid_api_key", n=day * per_day + i,
                        ip_address="192.0.2.7")
        h.clock.advance(DAY)
    h.records()
    return h


def _stopped(tmp: Path, **extra: Any) -> list[str]:
    _run(tmp, **extra).stop()
    return _files(tmp)


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


# Canonical form ---------------------------------------------------------------------------------


def test_a_duplicate_key_is_refused(tmp_path: Path) -> None:
    files = _stopped(tmp_path)
    target = tmp_path / "audit.log.2026-01-02"
    lines = _lines(target)
    # The hash covers the real address; a reader keeping the last key would see the forged one.
    lines[0] = lines[0].replace(b'"ip_address":"192.0.2.7"', b'"ip_address":"192.0.2.7","ip_address":"6.6.6.6"')
    target.write_bytes(b"".join(lines))
    report = verify(files)
    assert not report.ok
    assert report.message == f"{target}:1: not an audit record (key 'ip_address' appears twice): changed or corrupted"


def test_reformatted_whitespace_is_refused(tmp_path: Path) -> None:
    files = _stopped(tmp_path)
    target = tmp_path / "audit.log.2026-01-01"
    lines = _lines(target)
    lines[2] = json.dumps(json.loads(lines[2])).encode() + b"\n"  # same object, spaces after , and :
    target.write_bytes(b"".join(lines))
    report = verify(files)
    assert not report.ok and report.message.startswith(f"{target}:3: not an audit record (not in the canonical form")


def test_text_prepended_to_a_record_is_refused(tmp_path: Path) -> None:
    files = _stopped(tmp_path)
    target = tmp_path / "audit.log.2026-01-03"
    lines = _lines(target)
    lines[1] = b"Jan  3 00:00:01 host ccproxy: " + lines[1]
    target.write_bytes(b"".join(lines))
    report = verify(files)
    assert not report.ok and report.message.startswith(f"{target}:2: not an audit record (not a JSON object")
    # The same line is fine where a syslog receiver put it, when verify is told so.
    assert verify([str(target)], received=True).message.endswith("seq 9 to 12, chain intact from seq 9; "
                                                                  "no checkpoint given: records removed from the "
                                                                  "end or the start cannot be seen")


# Checkpoints ------------------------------------------------------------------------------------


def test_every_rotation_and_the_shutdown_write_a_checkpoint(tmp_path: Path) -> None:
    _stopped(tmp_path)
    cps = [c for c in _records(tmp_path / "audit.log.checkpoints") if c["reason"] != "interval"]
    assert [(c["seq"], c["first"], c["reason"]) for c in cps] == [
        (4, 1, "rotation"), (8, 1, "rotation"), (12, 1, "rotation"), (12, 1, "shutdown")]
    assert all(c["alg"] == "sha256" and c["stream"] == "audit" for c in cps)


def test_interval_checkpoints_are_written_only_when_the_head_moved(tmp_path: Path) -> None:
    h = Harness(tmp_path, _audit(tmp_path, checkpoints={"interval": "10s"}))
    try:
        events.emit("invalid_request", "notice")
        h.clock.advance(10)
        h.clock.advance(10)
        events.emit("invalid_request", "notice")
        h.clock.advance(10)
        cps = _records(tmp_path / "audit.log.checkpoints")
        assert [(c["seq"], c["reason"], c["time"]) for c in cps] == [
            (1, "interval", "2026-01-01T00:00:10.000Z"), (2, "interval", "2026-01-01T00:00:30.000Z")]
        # The checkpoint is of what is in the file: its hash is the last written record's.
        assert cps[-1]["hash"] == _records(h.path)[-1]["hash"]
    finally:
        h.stop()


def test_the_tail_cut_off_is_caught(tmp_path: Path) -> None:
    files = _stopped(tmp_path)
    live = tmp_path / "audit.log.2026-01-03"
    live.write_bytes(b"".join(_lines(live)[:2]))
    report = verify(files)
    assert not report.ok
    assert report.message.startswith("records after seq 10 are missing: the checkpoint of 2026-01-04T00:00:00.000Z")
    assert report.message.endswith(f"saw seq 12; {live} is older than the last checkpoint")


def test_the_live_file_deleted_is_caught(tmp_path: Path) -> None:
    h = _run(tmp_path)
    events.emit("invalid_request", "notice")
    h.stop()
    os.remove(tmp_path / "audit.log")
    report = verify(_files(tmp_path))
    assert not report.ok and report.message.startswith("records after seq 12 are missing")
    assert "saw seq 13" in report.message


def test_the_live_file_replaced_by_an_older_copy_is_caught(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    events.emit("invalid_request", "notice")
    h.records()
    shutil.copy(h.path, tmp_path / "old-copy")
    for _ in range(3):
        events.emit("invalid_request", "notice")
    h.stop()
    os.replace(tmp_path / "old-copy", h.path)
    report = verify(_files(tmp_path))
    assert not report.ok
    assert report.message.endswith(f"saw seq 4; {h.path} is older than the last checkpoint")


def test_the_oldest_rotated_file_deleted_is_caught(tmp_path: Path) -> None:
    _stopped(tmp_path)
    os.remove(tmp_path / "audit.log.2026-01-01")
    report = verify(_files(tmp_path))
    assert not report.ok
    assert report.message.startswith("records seq 1 to 4 are missing: the checkpoint of 2026-01-04T00:00:00.000Z "
                                     "still counted them")
    # Without the checkpoints the cut is invisible: that is what they are for.
    assert verify([f for f in _files(tmp_path) if not f.endswith(".checkpoints")]).ok


def test_files_removed_by_retention_move_the_start_in_the_next_checkpoint(tmp_path: Path) -> None:
    h = _run(tmp_path, days=5, per_day=2, outputs=[{"type": "file", "path": str(tmp_path / "audit.log"),
                                                     "retention": "2d"}])
    h.clock.advance(3600)
    h.stop()
    names = sorted(p.name for p in tmp_path.glob("audit.log*"))
    assert names == ["audit.log", "audit.log.2026-01-04", "audit.log.2026-01-05", "audit.log.checkpoints"]
    assert _records(tmp_path / "audit.log.checkpoints")[-1]["first"] == 7
    report = verify(_files(tmp_path))
    assert report.ok and "seq 7 to 10, chain intact from seq 7" in report.message, report.message


def test_a_rewritten_chain_disagrees_with_its_checkpoint(tmp_path: Path) -> None:
    from ccproxy.audit._record import record_hash

    files = _stopped(tmp_path)
    target = tmp_path / "audit.log.2026-01-01"
    records = _records(target)
    prev = records[0]["prev"]
    for record in records:  # a forger re-chains the whole file after an edit (no HMAC key here)
        record["reason"] = "nothing happened"
        record["prev"] = prev
        record["hash"] = prev = record_hash(record, None)
    target.write_bytes(b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in records))
    report = verify(files)
    assert not report.ok
    assert report.message == (f"{target}:4: record seq 4 is not the one the checkpoint of 2026-01-02T00:00:00.000Z "
                              "saw: the chain was rewritten from there")


def test_ed25519_checkpoints_verify_with_the_public_key_and_a_forged_one_fails(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key_path = tmp_path / "signing.pem"
    assert main(["audit", "gen-signing-key", str(key_path)]) == 0
    public = tmp_path / "public.pem"
    public.write_text(capsys.readouterr().out)
    assert oct(key_path.stat().st_mode & 0o777) == "0o600"
    files = _stopped(tmp_path, checkpoints={"signing_key": str(key_path)})
    cps = tmp_path / "audit.log.checkpoints"
    assert {c["alg"] for c in _records(cps)} == {"ed25519"}
    assert main(["audit", "verify", "--public-key", str(public), *files]) == 0
    assert "signature (ed25519) verified" in capsys.readouterr().out
    # A forger who cut the tail writes a checkpoint that agrees with the cut: the signature fails.
    lines = _lines(cps)
    forged = json.loads(lines[-1])
    forged_at = len(lines)
    forged["seq"] = 10
    cps.write_bytes(b"".join(lines[:-1]) + json.dumps(forged, separators=(",", ":")).encode() + b"\n")
    assert main(["audit", "verify", "--public-key", str(public), *files]) == 1
    assert f"{cps}:{forged_at}: checkpoint seq 10 has a bad signature: forged or changed" in capsys.readouterr().err


def test_hmac_checkpoints_need_the_key(tmp_path: Path) -> None:
    files = _stopped(tmp_path, hmac_key=KEY)
    cps = _records(tmp_path / "audit.log.checkpoints")
    assert {c["alg"] for c in cps} == {"hmac-sha256"}
    assert "signature (hmac-sha256) verified" in verify(files, KEY.encode()).message
    assert not verify(files, b"another-key-of-enough-length-000").ok


def test_audit_checkpoint_signs_the_head_on_disk_and_refuses_a_broken_chain(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _stopped(tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"server": {"tls": {"enabled": False}}, "security": {"audit": _audit(tmp_path)}}))
    assert main(["audit", "checkpoint", "--config", str(config)]) == 0
    assert "checkpoint seq 12 (sha256)" in capsys.readouterr().out
    assert _records(tmp_path / "audit.log.checkpoints")[-1]["reason"] == "request"
    live = tmp_path / "audit.log.2026-01-02"
    live.write_bytes(b"".join(_lines(live)[:1]))
    assert main(["audit", "checkpoint", "--config", str(config)]) == 1
    assert "not signed, the chain does not verify: " in capsys.readouterr().err


# The daemon's own view: restarts, files replaced under it, crashes -----------------------------


def test_a_tail_cut_while_stopped_is_reported_at_restart_and_the_gap_kept(tmp_path: Path) -> None:
    _stopped(tmp_path, hmac_key=KEY)
    live = tmp_path / "audit.log.2026-01-03"
    live.write_bytes(b"".join(_lines(live)[:1]))  # seq 9 left; 10 to 12 cut
    h = Harness(tmp_path, _audit(tmp_path, hmac_key=KEY), start=1_767_225_600.0 + 3 * DAY + 60)
    [notice] = h.records()
    h.stop()
    assert notice["event"] == "audit_records_missing" and notice["severity"] == "critical"
    assert notice["seq"] == 13  # the chain goes on from the checkpoint, not from the cut
    assert notice["reason"].startswith("records after seq 9 are missing: the last checkpoint")
    report = verify(_files(tmp_path), KEY.encode())
    assert not report.ok and report.message.endswith("seq 10 to 12 removed (the next record found is seq 13)")


def test_the_live_file_deleted_while_running_is_noticed_and_reopened(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    try:
        events.emit("invalid_request", "notice")
        h.records()
        os.remove(h.path)
        h.clock.advance(1.0)  # the next sync tick looks at the path
        events.emit("invalid_request", "notice")
        records = h.records()
    finally:
        h.stop()
    assert [(r["seq"], r["event"]) for r in records] == [(2, "audit_file_replaced"), (3, "invalid_request")]
    assert records[0]["found"] == "deleted" and records[0]["severity"] == "critical"
    report = verify(_files(tmp_path))
    assert not report.ok  # the deleted record stays missing; the notice says where it went


def test_the_live_file_replaced_while_running_is_noticed(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    try:
        events.emit("invalid_request", "notice")
        h.records()
        shutil.copy(h.path, tmp_path / "copy")
        events.emit("invalid_request", "notice")
        h.records()
        os.replace(tmp_path / "copy", h.path)  # an older copy put in place under the daemon
        events.emit("invalid_request", "notice")
        h.records()
        records = h.records()
    finally:
        h.stop()
    # The copy held seq 1; seq 2 went to the file that was replaced; seq 3 (written when the swap
    # was found) and the notice follow in the copy.
    assert [(r["seq"], r["event"]) for r in records] == [
        (1, "invalid_request"), (3, "invalid_request"), (4, "audit_file_replaced")]
    assert records[2]["found"] == "replaced by another file"


def test_a_half_written_line_after_a_crash_is_sealed_and_verify_tells_it_from_tampering(tmp_path: Path) -> None:
    h = Harness(tmp_path, _audit(tmp_path, hmac_key=KEY))
    for _ in range(3):
        events.emit("invalid_request", "notice")
    h.records()
    h.trail.stopped = True  # a kill -9: no shutdown, no checkpoint, no flush
    events.remove_observer(h.trail)
    whole = h.path.read_bytes()
    h.path.write_bytes(whole + whole.splitlines(keepends=True)[-1][:57])  # a fourth record, cut mid-write
    h2 = Harness(tmp_path, _audit(tmp_path, hmac_key=KEY))
    events.emit("invalid_request", "notice")
    h2.clock.advance(1.0)
    h2.stop()
    lines = h.path.read_bytes().splitlines()
    assert len(lines[3]) == 57 and lines[4].startswith(b'{"timestamp"')
    assert [(r["seq"], r["event"]) for r in _records_of(lines)] == [
        (1, "invalid_request"), (2, "invalid_request"), (3, "invalid_request"), (4, "audit_file_damaged"),
        (5, "invalid_request")]
    damage = _records_of(lines)[3]
    assert damage["offset"] == len(whole) and damage["partial_bytes"] == 57
    report = verify(_files(tmp_path), KEY.encode())
    assert report.ok, report.message
    assert "1 lines cut short by a crash, sealed by the record after them" in report.message
    # The same bytes placed by hand, without the trail's note after them, are tampering.
    h.path.write_bytes(b"\n".join(lines[:3] + [lines[3]] + lines[5:]) + b"\n")
    assert "not an audit record" in verify([str(h.path)], KEY.encode()).message


def _records_of(lines: list[bytes]) -> list[dict[str, Any]]:
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


# Duplicates from a syslog receiver --------------------------------------------------------------


def _received(tmp: Path, lines: list[bytes]) -> str:
    path = tmp / "received.log"
    path.write_bytes(b"".join(b"<38>1 2026-01-01T00:00:00Z host ccproxy - ev - " + line for line in lines))
    return str(path)


def test_exact_duplicates_are_accepted_and_counted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _stopped(tmp_path)
    lines = _lines(tmp_path / "audit.log.2026-01-01")  # seq 1 to 4
    resent = _received(tmp_path, lines[:3] + lines[1:3] + lines[3:] + lines[3:])  # 1 2 3 2 3 4 4
    assert main(["audit", "verify", "--received", resent]) == 0
    assert "OK: 4 records, seq 1 to 4" in (out := capsys.readouterr().out) and "3 exact duplicates ignored" in out


def test_a_duplicate_with_other_content_is_refused(tmp_path: Path) -> None:
    _stopped(tmp_path)
    lines = _lines(tmp_path / "audit.log.2026-01-01")
    edited = lines[1].replace(b"invalid_api_key", b"a_different_one")
    report = verify([_received(tmp_path, lines[:3] + [edited] + lines[3:])], received=True)
    assert not report.ok
    assert report.message.endswith("record seq 2 appears again with different content (expected seq 4)")


def test_reordering_and_gaps_still_fail_beside_duplicates(tmp_path: Path) -> None:
    _stopped(tmp_path)
    lines = _lines(tmp_path / "audit.log.2026-01-01")
    swapped = verify([_received(tmp_path, [lines[0], lines[1], lines[1], lines[3], lines[2]])], received=True)
    assert not swapped.ok and "record seq 4 is out of order (expected seq 3)" in swapped.message
    gap = verify([_received(tmp_path, [lines[0], lines[0], lines[1], lines[3]])], received=True)
    assert not gap.ok and gap.message.endswith("seq 3 removed (the next record found is seq 4)")


def test_checkpoint_lines_in_a_receivers_file_are_used(tmp_path: Path) -> None:
    files = _stopped(tmp_path)
    cps = _lines(tmp_path / "audit.log.checkpoints")
    records = [line for f in files if not f.endswith(".checkpoints") for line in _lines(Path(f))]
    records.sort(key=lambda line: json.loads(line)["seq"])
    ok = verify([_received(tmp_path, records + cps)], received=True)
    assert ok.ok and f"{len(cps)} checkpoints agree" in ok.message, ok.message
    cut = verify([_received(tmp_path, records[:-1] + cps)], received=True)
    assert not cut.ok and cut.message.startswith("records after seq 11 are missing")


def test_checkpoint_helpers_refuse_a_wrong_key_type(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    (tmp_path / "ec.pem").write_bytes(pem)
    with pytest.raises(ValueError, match="not an Ed25519"):
        _checkpoint.load_private_key(str(tmp_path / "ec.pem"))


def test_an_access_file_deleted_under_the_daemon_explains_itself_in_its_own_chain(tmp_path: Path) -> None:
    from twisted.logger import Logger

    access = tmp_path / "access.log"
    h = Harness(tmp_path, {"outputs": [{"type": "file", "path": str(tmp_path / "audit.log")},
                                       {"type": "file", "path": str(access), "records": "access"}]})

    def request() -> None:
        Logger(namespace="ccproxy.access").info("{status}", method="GET", path="/v1/models", status=200,
                                                latency_ms=1.0, key_id="-", request_id="r", client_ip="192.0.2.1")

    try:
        request()
        request()
        h.records(access)
        os.remove(access)
        h.clock.advance(1.0)
        request()
        records = h.records(access)
        audit = h.records()
    finally:
        h.stop()
    assert [(r["seq"], r["event"]) for r in records] == [(3, "audit_file_replaced"), (4, "http_request")]
    assert [(r["event"], r["stream"]) for r in audit] == [("audit_file_replaced", "access")]
    # The access chain's checkpoints are the ones verify holds the access file to.
    report = verify([str(access), str(tmp_path / "access.log.checkpoints")])
    assert not report.ok and report.message.startswith("records seq 1 to 2 are missing"), report.message
