"""Crypto-shredding on a task.Clock: records sealed per subject, erasure, the key store and its master key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ccproxy import events
from ccproxy.audit.privacy import KeyStore, KeyStoreError, open_sealed
from ccproxy.audit.privacy._keys import master_key
from ccproxy.audit.verify import verify
from tests.support.audit import Harness

MASTER = "privacy-test-master-key-000000000000000000000"


def _harness(tmp: Path) -> Harness:
    return Harness(tmp, {"outputs": [{"type": "file", "path": str(tmp / "audit.log")}]},
                   privacy={"gdpr": {"right_to_deletion": True},
                            "keys": {"store": str(tmp / "keys"), "master_key": MASTER}})


def _store(tmp: Path) -> KeyStore:
    return KeyStore(str(tmp / "keys"), master_key(MASTER)).open()


def test_personal_fields_are_sealed_under_the_subject_and_open_with_its_key(tmp_path: Path) -> None:
    h = _harness(tmp_path)
    try:
        events.emit("authentication_success", "info", user_id="u-1", api_key_id="k-1", ip_address="192.0.2.9",
                    reason="login from 192.0.2.9")
        events.emit("authentication_failure", "warning", ip_address="192.0.2.9", reason="invalid_api_key")
        events.emit("configuration_change", "notice", outcome="applied")
        records = h.records()
    finally:
        h.stop()
    data = h.path.read_bytes()
    for probe in (b"u-1", b"k-1", b"192.0.2.9"):
        assert probe not in data
    first, second, third = records
    assert (first["user_id"], first["api_key_id"], first["ip_address"], first["reason"]) == (None, None, None, None)
    store = _store(tmp_path)
    assert first["subject"] == store.subject_id("user_id", "u-1")
    assert second["subject"] == store.subject_id("ip_address", "192.0.2.9")  # no user, no key: the address
    assert "subject" not in third and "sealed" not in third  # nothing personal: nothing sealed
    key = store.subject_key(first["subject"], create=False)
    assert key is not None
    opened = open_sealed(first, key)
    assert opened is not None
    assert (opened["user_id"], opened["api_key_id"], opened["ip_address"], opened["reason"]) == (
        "u-1", "k-1", "192.0.2.9", "login from 192.0.2.9")
    assert open_sealed(second, key) is None  # another subject's key opens nothing
    assert verify([str(h.path)]).ok


def test_forget_destroys_the_key_and_the_trail_records_the_erasure_without_the_name(tmp_path: Path) -> None:
    h = _harness(tmp_path)
    try:
        events.emit("authentication_success", "info", user_id="u-1", api_key_id="k-1")
        h.records()
        store = _store(tmp_path)
        sid = store.subject_id("user_id", "u-1")
        assert store.forget(sid, "user_id", "2026-01-01T00:00:02Z") is True
        assert store.subject_key(sid, create=False) is None
        h.clock.advance(1.0)  # the trail's next look at the store
        events.emit("authentication_success", "info", user_id="u-1", api_key_id="k-1")
        records = h.records()
    finally:
        h.stop()
    erased = [r for r in records if r["event"] == "privacy_subject_erased"]
    assert len(erased) == 1 and erased[0]["subject"] == sid and erased[0]["kind"] == "user_id"
    assert b"u-1" not in h.path.read_bytes()
    old, new = records[0], records[-1]
    assert old["subject"] == new["subject"] == sid
    fresh = _store(tmp_path).subject_key(sid, create=False)  # a new key for what came after the erasure
    assert fresh is not None and open_sealed(old, fresh) is None
    assert open_sealed(new, fresh) is not None
    assert verify([str(h.path)]).ok


def test_the_key_store_needs_the_master_key_it_was_wrapped_with(tmp_path: Path) -> None:
    store = _store(tmp_path)
    sid = store.subject_id("user_id", "u-2")
    key = store.subject_key(sid)
    other = KeyStore(str(tmp_path / "keys"), master_key("another-master-key-0000000000000000000")).open()
    with pytest.raises(KeyStoreError, match="which is not configured"):
        other.subject_key(sid, create=False)
    rotated = KeyStore(str(tmp_path / "keys"), master_key("another-master-key-0000000000000000000"),
                       [master_key(MASTER)]).open()
    assert rotated.rewrap() == (2, 0)  # the index key and the subject key
    assert rotated.rewrap() == (0, 2)
    alone = KeyStore(str(tmp_path / "keys"), master_key("another-master-key-0000000000000000000")).open()
    assert alone.subject_key(sid, create=False) == key
    assert alone.subject_id("user_id", "u-2") == sid


def test_files_of_the_store_are_private_and_hold_no_subject(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.subject_key(store.subject_id("user_id", "visible-name"))
    for path in (tmp_path / "keys").rglob("*"):
        if path.is_file():
            assert path.stat().st_mode & 0o077 == 0
            assert b"visible-name" not in path.read_bytes()
            if path.suffix == ".key":
                wrapped: dict[str, Any] = json.loads(path.read_bytes())
                assert set(wrapped) == {"v", "mk", "key"}


def _at_rest(tmp: Path, **more: Any) -> Harness:
    return Harness(tmp, {"outputs": [{"type": "file", "path": str(tmp / "audit.log")}, *more.pop("outputs", [])]},
                   privacy={"hipaa": {"enabled": True, "encryption_at_rest": True},
                            "keys": {"store": str(tmp / "keys"), "master_key": MASTER}})


def test_encryption_at_rest_writes_no_event_name_or_address_and_verify_reads_with_the_key(tmp_path: Path) -> None:
    from ccproxy.audit.privacy import AtRest

    h = _at_rest(tmp_path)
    try:
        for _ in range(3):
            events.emit("authentication_failure", "warning", ip_address="198.51.100.4", reason="invalid_api_key")
        h.clock.advance(1.0)
    finally:
        h.stop()
    data = h.path.read_bytes()
    assert data.count(b"\ne1:") == 2 and data.startswith(b"e1:")
    for probe in (b"authentication_failure", b"198.51.100.4", b"invalid_api_key", b"timestamp"):
        assert probe not in data
    decode = AtRest(_store(tmp_path).at_rest_key(create=False) or b"").decode
    files = [str(h.path), str(tmp_path / "audit.log.checkpoints")]
    report = verify(files, decode=decode)
    assert report.ok and report.records == 3, report.message
    without = verify(files)
    assert not without.ok and "encrypted at rest (privacy.hipaa.encryption_at_rest): give --config" in without.message
    flipped = bytearray(data)
    flipped[40] ^= 0x01
    h.path.write_bytes(bytes(flipped))
    broken = verify(files, decode=decode)
    assert not broken.ok and broken.message == (
        f"{h.path}:1: not an audit record (cannot be decrypted: changed, or encrypted with another key): "
        "changed or corrupted")


def test_encryption_at_rest_covers_the_syslog_spool_and_a_restart_resumes_the_chain(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    syslog = {"type": "syslog", "protocol": "tcp", "host": "127.0.0.1", "port": 9, "spool_path": str(spool),
              "queue_size": 1}
    h = _at_rest(tmp_path, outputs=[syslog])
    try:
        for _ in range(4):
            events.emit("authentication_failure", "warning", ip_address="198.51.100.4")
        h.clock.advance(1.0)
    finally:
        h.stop()
    data = spool.read_bytes()
    assert data and all(line.startswith(b"e1:") for line in data.splitlines())
    assert b"198.51.100.4" not in data and b"authentication_failure" not in data
    h2 = _at_rest(tmp_path, outputs=[syslog])
    try:
        events.emit("invalid_request", "notice")
        h2.clock.advance(1.0)
        sink = next(s for s in h2.trail.sinks.values() if hasattr(s, "spool"))
        assert [m.split(b" - ", 1)[1][:14] for m in sink.spool.read(10)][:2] == [b'{"timestamp":"'] * 2
    finally:
        h2.stop()
    decode = _decoder(tmp_path)
    assert [decode(line)["seq"] for line in h.path.read_bytes().splitlines()] == [1, 2, 3, 4, 5]


def _decoder(tmp: Path) -> Any:
    from ccproxy.audit.privacy import AtRest

    return AtRest(_store(tmp).at_rest_key(create=False) or b"").decode


def test_the_privacy_commands_refuse_what_the_config_does_not_allow(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ccproxy.cli import main

    path = tmp_path / "c.yaml"
    path.write_text(json.dumps({"server": {"tls": {"enabled": False}},
                                "security": {"audit": {"outputs": [{"type": "file",
                                                                   "path": str(tmp_path / "audit.log")}]}}}))
    assert main(["privacy", "forget", "--config", str(path), "--user-id", "u-1"]) == 1
    assert "privacy.gdpr.right_to_deletion is off" in capsys.readouterr().err
    assert main(["privacy", "export", "--config", str(path), "--ip", "192.0.2.1"]) == 1
    assert "privacy.gdpr.data_portability is off" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["privacy", "export", "--config", str(path), "--ip", "192.0.2.1", "--user-id", "u-1"])


def test_export_reads_rotated_files_and_filters_by_date(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ccproxy.cli import main

    audit = {"outputs": [{"type": "file", "path": str(tmp_path / "audit.log")}]}
    privacy = {"gdpr": {"right_to_deletion": True, "data_portability": True},
               "keys": {"store": str(tmp_path / "keys"), "master_key": MASTER}}
    h = Harness(tmp_path, audit, privacy=privacy)
    try:
        for day in range(3):
            events.emit("authentication_success", "info", user_id="u-9", api_key_id="k-9", n=day)
            events.emit("authentication_success", "info", user_id="someone-else", n=day)
            h.clock.advance(86400.0)
        h.records()
    finally:
        h.stop()
    assert len(list(tmp_path.glob("audit.log.2026-*"))) == 3
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps({"server": {"tls": {"enabled": False}}, "security": {"audit": audit},
                                "privacy": privacy}))
    assert main(["privacy", "export", "--config", str(path), "--user-id", "u-9"]) == 0
    out = capsys.readouterr()
    lines = [json.loads(line) for line in out.out.splitlines()]
    assert [(e["record"]["n"], e["record"]["user_id"], Path(e["file"]).name) for e in lines] == [
        (0, "u-9", "audit.log.2026-01-01"), (1, "u-9", "audit.log.2026-01-02"), (2, "u-9", "audit.log.2026-01-03")]
    assert "exported 3 records" in out.err
    assert main(["privacy", "export", "--config", str(path), "--user-id", "u-9", "--since", "2026-01-02"]) == 0
    assert [json.loads(line)["record"]["n"] for line in capsys.readouterr().out.splitlines()] == [1, 2]


def test_files_the_commands_write_as_root_belong_to_the_store_owner(tmp_path: Path) -> None:
    import os

    from ccproxy.audit import _checkpoint

    store = _store(tmp_path)
    sid = store.subject_id("user_id", "u-3")
    store.subject_key(sid)
    daemon_user = 65534 if os.geteuid() == 0 else os.geteuid()  # root gives files away; others keep them
    for path in [tmp_path / "keys", *(tmp_path / "keys").rglob("*")]:
        os.chown(path, daemon_user, daemon_user)
    os.chown(tmp_path, daemon_user, daemon_user)
    assert store.forget(sid, "user_id", "2026-01-01T00:00:00Z")
    assert store.rewrap() == (0, 1)
    checkpoints = tmp_path / "audit.log.checkpoints"
    _checkpoint.append(str(checkpoints), {"type": "checkpoint"})
    for path in (tmp_path / "keys" / "erasures.pending", tmp_path / "keys" / "generation", checkpoints):
        assert path.stat().st_uid == daemon_user, path


def test_a_new_subject_key_is_synced_off_the_request_path(tmp_path: Path) -> None:
    h = _harness(tmp_path)
    try:
        h.clock.advance(0)  # the store's first look
        store = h.trail.sealer.store
        synced: list[list[str]] = []
        real = store.sync_new
        store.sync_new = lambda paths: synced.append(paths) or real(paths)  # type: ignore[method-assign]
        events.emit("authentication_success", "info", user_id="u-5")
        assert len(store.unsynced) == 1 and synced == []  # written, not yet synced
        h.clock.advance(1.0)
        assert store.unsynced == [] and [Path(p).name for p in synced[0]] == [
            store.subject_id("user_id", "u-5") + ".key"]
    finally:
        h.stop()
