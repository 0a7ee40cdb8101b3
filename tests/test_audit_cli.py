"""`ccproxy audit ...` and `ccproxy privacy ...` run by an operator: each refusal is one line on standard
error with a non-zero status (2 for verify's usage faults, 1 otherwise), never a traceback, and the
commands act only on what the config allows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ccproxy import events
from ccproxy.audit.privacy import KeyStore, at_rest_decoder, open_store
from ccproxy.audit.privacy._keys import master_key
from ccproxy.cli import main
from ccproxy.config import parse
from tests.support.audit import Harness

MASTER = "audit-cli-test-master-key-0000000000000000000"
OTHER = "audit-cli-test-other-master-key-000000000000"


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _config(tmp: Path, name: str = "c.yaml", **sections: Any) -> Path:
    data: dict[str, Any] = {"server": {"tls": {"enabled": False}}, **sections}
    path = tmp / name
    path.write_text(json.dumps(data))
    return path


def _file_output(tmp: Path) -> dict[str, Any]:
    return {"outputs": [{"type": "file", "path": str(tmp / "audit.log")}]}


def _keys(tmp: Path, master: str = MASTER, **more: Any) -> dict[str, Any]:
    return {"store": str(tmp / "keys"), "master_key": master, **more}


def _trail(tmp: Path, privacy: dict[str, Any]) -> None:
    h = Harness(tmp, _file_output(tmp), privacy=privacy)
    try:
        events.emit("authentication_success", "info", user_id="u-1", api_key_id="k-1", ip_address="192.0.2.1")
        events.emit("authentication_success", "info", user_id="u-2", api_key_id="k-2", ip_address="192.0.2.2")
        h.records()
    finally:
        h.stop()


# -- audit verify, checkpoint, gen-signing-key


def test_verify_refuses_a_public_key_it_cannot_use(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "audit.log"
    log.write_text("")
    code, _, err = _run(capsys, "audit", "verify", "--public-key", str(tmp_path / "none.pem"), str(log))
    assert (code, err) == (2, f"--public-key: [Errno 2] No such file or directory: '{tmp_path}/none.pem'\n")
    (tmp_path / "bad.pem").write_text("-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----\n")
    code, _, err = _run(capsys, "audit", "verify", "--public-key", str(tmp_path / "bad.pem"), str(log))
    assert code == 2 and err.startswith("--public-key: ") and err.count("\n") == 1


def test_verify_of_a_file_that_is_not_there(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(capsys, "audit", "verify", str(tmp_path / "gone.log")) == (
        2, "", f"{tmp_path}/gone.log: No such file or directory\n")


def test_verify_with_a_config_that_cannot_decrypt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "audit.log"
    log.write_text("")
    broken = _config(tmp_path, "broken.yaml", server={"port": "eighty"})
    code, _, err = _run(capsys, "audit", "verify", "--config", str(broken), str(log))
    assert code == 2 and err.startswith(f"{broken}: invalid: server.port: ")
    at_rest = {"hipaa": {"enabled": True, "encryption_at_rest": True}, "keys": _keys(tmp_path)}
    config = _config(tmp_path, privacy=at_rest)
    # A key store without its file key: nothing was ever encrypted with this config.
    assert _run(capsys, "audit", "verify", "--config", str(config), str(log)) == (
        2, "", f"the file key is missing from {tmp_path}/keys: the encrypted files cannot be read\n")
    # A file key wrapped under a master key the config does not hold.
    KeyStore(str(tmp_path / "keys"), master_key(OTHER)).open().at_rest_key()
    code, _, err = _run(capsys, "audit", "verify", "--config", str(config), str(log))
    assert code == 2 and err.startswith("the file key of the key store cannot be read: ")
    assert "which is not configured" in err


def test_the_file_key_reads_what_was_encrypted_at_rest(tmp_path: Path) -> None:
    from ccproxy.audit.privacy import AtRest

    at_rest = {"hipaa": {"enabled": True, "encryption_at_rest": True}, "keys": _keys(tmp_path)}
    config = parse({"server": {"tls": {"enabled": False}}, "privacy": at_rest}, environ={})
    key = open_store(config.privacy).at_rest_key()
    assert key is not None
    line = AtRest(key).seal(b'{"event":"x","seq":1}\n')
    decode, problem = at_rest_decoder(config)
    assert problem == "" and decode(line.rstrip(b"\n"))["event"] == "x"
    assert at_rest_decoder(parse({"server": {"tls": {"enabled": False}}}, environ={}))[0](b'{"seq":1}') == {"seq": 1}


def test_checkpoint_needs_a_valid_config_with_a_file_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = _config(tmp_path, "broken.yaml", server={"port": "eighty"})
    code, _, err = _run(capsys, "audit", "checkpoint", "--config", str(broken))
    assert code == 1 and err.startswith(f"{broken}: invalid: server.port: ")
    syslog_only = _config(tmp_path, "syslog.yaml", security={"audit": {"outputs": [
        {"type": "syslog", "protocol": "udp", "host": "127.0.0.1", "spool_path": str(tmp_path / "s.spool")}]}})
    assert _run(capsys, "audit", "checkpoint", "--config", str(syslog_only)) == (
        1, "", "no audit file output is configured: nothing to checkpoint\n")
    off = _config(tmp_path, "off.yaml", security={"audit": {"enabled": False, **_file_output(tmp_path)}})
    assert _run(capsys, "audit", "checkpoint", "--config", str(off)) == (
        1, "", "no audit file output is configured: nothing to checkpoint\n")
    at_rest = _config(tmp_path, "at-rest.yaml", security={"audit": _file_output(tmp_path)},
                      privacy={"hipaa": {"enabled": True, "encryption_at_rest": True}, "keys": _keys(tmp_path)})
    assert _run(capsys, "audit", "checkpoint", "--config", str(at_rest)) == (
        1, "", f"the file key is missing from {tmp_path}/keys: the encrypted files cannot be read\n")
    assert not (tmp_path / "audit.log.checkpoints").exists()  # nothing was signed


def test_gen_signing_key_where_it_cannot_write(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(capsys, "audit", "gen-signing-key", str(tmp_path / "no-such-dir" / "k.pem")) == (
        1, "", f"{tmp_path}/no-such-dir/k.pem: No such file or directory\n")


# -- privacy forget, export, rotate-master-key


def test_privacy_commands_on_an_invalid_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = _config(tmp_path, "broken.yaml", server={"port": "eighty"})
    for argv in (["forget", "--user-id", "u"], ["export", "--user-id", "u"], ["rotate-master-key"]):
        code, out, err = _run(capsys, "privacy", *argv, "--config", str(broken))
        assert (code, out) == (1, "") and err.startswith(f"{broken}: invalid: server.port: "), argv


def test_forget_destroys_a_key_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    privacy = {"gdpr": {"right_to_deletion": True}, "keys": _keys(tmp_path)}
    _trail(tmp_path, privacy)
    config = _config(tmp_path, security={"audit": _file_output(tmp_path)}, privacy=privacy)
    sid = KeyStore(str(tmp_path / "keys"), master_key(MASTER)).open().subject_id("user_id", "u-1")
    code, out, _ = _run(capsys, "privacy", "forget", "--config", str(config), "--user-id", "u-1")
    assert (code, out) == (0, f"subject {sid}: key destroyed; the erasure is recorded in the audit trail as "
                              "privacy_subject_erased\n")
    code, out, _ = _run(capsys, "privacy", "forget", "--config", str(config), "--user-id", "u-1")
    assert code == 0 and out.startswith(f"subject {sid}: had no key (no record of it was sealed, or it was erased")


def test_export_of_an_erased_subject_says_how_many_records_it_cannot_open(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    privacy = {"gdpr": {"right_to_deletion": True, "data_portability": True}, "keys": _keys(tmp_path)}
    _trail(tmp_path, privacy)
    with (tmp_path / "audit.log").open("ab") as f:
        f.write(b"a cut line\n")  # damaged lines are verify's business: export passes over them
    config = _config(tmp_path, security={"audit": _file_output(tmp_path)}, privacy=privacy)
    code, out, err = _run(capsys, "privacy", "export", "--config", str(config), "--user-id", "u-2")
    assert code == 0 and [json.loads(line)["record"]["user_id"] for line in out.splitlines()] == ["u-2"]
    assert err == "exported 1 records\n"
    _run(capsys, "privacy", "forget", "--config", str(config), "--user-id", "u-2")
    assert _run(capsys, "privacy", "export", "--config", str(config), "--user-id", "u-2") == (
        0, "", "exported 0 records; 1 records of this subject were erased (its key was destroyed)\n")


def test_export_without_erasure_reads_records_in_clear_by_the_field_asked(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    privacy = {"gdpr": {"data_portability": True}}
    _trail(tmp_path, privacy)
    config = _config(tmp_path, security={"audit": _file_output(tmp_path)}, privacy=privacy)
    code, out, err = _run(capsys, "privacy", "export", "--config", str(config), "--ip", "192.0.2.2")
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [(r["stream"], r["record"]["user_id"], r["line"]) for r in rows] == [("audit", "u-2", 2)]
    assert err == "exported 1 records\n"
    # The records are of 2026-01-01T00:00Z: 01:00 at UTC+2 is before them, 01:00 UTC after.
    code, out, err = _run(capsys, "privacy", "export", "--config", str(config), "--ip", "192.0.2.2",
                          "--since", "2026-01-01T01:00:00+02:00")
    assert (code, len(out.splitlines()), err) == (0, 1, "exported 1 records\n")
    code, out, err = _run(capsys, "privacy", "export", "--config", str(config), "--ip", "192.0.2.2",
                          "--since", "2026-01-01T01:00:00Z")
    assert (code, out, err) == (0, "", "exported 0 records\n")


def test_export_refuses_a_date_it_cannot_read_and_files_it_cannot_decrypt(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, security={"audit": _file_output(tmp_path)},
                     privacy={"gdpr": {"data_portability": True}})
    with pytest.raises(SystemExit) as info:
        main(["privacy", "export", "--config", str(config), "--ip", "192.0.2.2", "--since", "last tuesday"])
    assert info.value.code == "--since 'last tuesday': not an ISO 8601 date or time"
    at_rest = _config(tmp_path, "at-rest.yaml", security={"audit": _file_output(tmp_path)},
                      privacy={"gdpr": {"data_portability": True}, "keys": _keys(tmp_path),
                               "hipaa": {"enabled": True, "encryption_at_rest": True}})
    assert _run(capsys, "privacy", "export", "--config", str(at_rest), "--ip", "192.0.2.2") == (
        1, "", f"the file key is missing from {tmp_path}/keys: the encrypted files cannot be read\n")


def test_commands_that_need_the_key_store_say_why_it_cannot_be_opened(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "keys").write_text("a file where the store's folder should be")
    privacy = {"gdpr": {"right_to_deletion": True, "data_portability": True}, "keys": _keys(tmp_path)}
    config = _config(tmp_path, security={"audit": _file_output(tmp_path)}, privacy=privacy)
    for argv in (["forget", "--user-id", "u"], ["export", "--user-id", "u"], ["rotate-master-key"]):
        code, out, err = _run(capsys, "privacy", *argv, "--config", str(config))
        assert (code, out) == (1, "") and err.startswith(f"privacy key store {tmp_path}/keys: "), argv
    no_master = _config(tmp_path, "no-master.yaml", privacy={"keys": {"store": str(tmp_path / "k2")}})
    assert _run(capsys, "privacy", "rotate-master-key", "--config", str(no_master)) == (
        1, "", f"privacy key store {tmp_path}/k2: privacy.keys.master_key is not set\n")


def test_rotate_master_key_rewraps_under_the_new_key_and_stops_at_one_it_cannot_unwrap(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = KeyStore(str(tmp_path / "keys"), master_key(OTHER)).open()
    old.subject_key(old.subject_id("user_id", "u-1"))
    without_old = _config(tmp_path, "new.yaml", privacy={"keys": _keys(tmp_path)})
    code, out, err = _run(capsys, "privacy", "rotate-master-key", "--config", str(without_old))
    assert (code, out) == (1, "") and err.startswith("not every key was rewrapped: ")
    assert "which is not configured" in err
    with_old = _config(tmp_path, "rotate.yaml", privacy={"keys": _keys(tmp_path, old_master_keys=[OTHER])})
    code, out, _ = _run(capsys, "privacy", "rotate-master-key", "--config", str(with_old))
    store = KeyStore(str(tmp_path / "keys"), master_key(MASTER)).open()
    assert code == 0 and out.startswith(f"2 keys rewrapped under master key {store.current}, 0 already were;")
    assert _run(capsys, "privacy", "rotate-master-key", "--config", str(without_old))[1].startswith(
        f"0 keys rewrapped under master key {store.current}, 2 already were;")
