"""GDPR on the real daemon: two users, two keys, two loopback addresses; export one, forget one.

Personal fields are sealed per subject; `ccproxy privacy export` returns exactly one user's records;
`ccproxy privacy forget` leaves no file that yields the user's id or address, while `audit verify`
passes and the other user's export is unchanged; master key rotation rewrites no record.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anthropic

from tests.support.clients import _httpx
from tests.support.daemon import Daemon

MASTER = "privacy-e2e-master-key-000000000000000000000000"
NEW_MASTER = "privacy-e2e-master-key-111111111111111111111111"
ALICE_KEY = "sk-ant-api03-ALICEKEY0000000000000000000000000000000000000000000000a11c"
BOB_KEY = "sk-ant-api03-BOBKEY11111111111111111111111111111111111111111111111b0b"
ALICE, BOB = "alice-7f3e9", "bob-c41d2"
ALICE_IP, BOB_IP = "127.0.0.2", "127.0.0.1"
ENV = {"CCPROXY_MASTER_KEY": MASTER}


def _config(tmp: Path) -> dict[str, Any]:
    return {
        "security": {
            "auth": {"enabled": True, "api_keys": [
                {"id": "key-alice", "key": ALICE_KEY, "user_id": ALICE},
                {"id": "key-bob", "key": BOB_KEY, "user_id": BOB}]},
            "audit": {"outputs": [
                {"type": "file", "path": str(tmp / "logs" / "audit.log"), "flush_interval": "20ms"},
                {"type": "file", "path": str(tmp / "logs" / "access.log"), "records": "access",
                 "flush_interval": "20ms"}]},
        },
        "privacy": {"gdpr": {"right_to_deletion": True, "data_portability": True},
                    "keys": {"store": str(tmp / "keys"), "master_key": "${CCPROXY_MASTER_KEY}"}},
    }


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ccproxy.cli", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or ENV), "PYTHONPATH": str(Path(__file__).resolve().parents[1])})


def _request(d: Daemon, key: str, source: str, ok: bool = True) -> None:
    ctx = ssl.create_default_context(cafile=d.ca_file)
    transport = _httpx.HTTPTransport(local_address=source, verify=ctx)
    client = anthropic.Anthropic(base_url=d.url, api_key=key, max_retries=0,
                                 http_client=_httpx.Client(transport=transport, timeout=30))
    message = {"model": "claude-sonnet-4-6", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    if ok:
        client.messages.create(**message)
    else:
        try:
            client.messages.create(**message)
        except anthropic.AuthenticationError:
            return
        raise AssertionError("a wrong key was accepted")


def _export(d: Daemon, *who: str) -> list[dict[str, Any]]:
    result = _cli("privacy", "export", "--config", str(d.config_path), *who)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def _every_file(tmp: Path) -> list[Path]:
    return [p for p in tmp.rglob("*") if p.is_file() and p.suffix not in (".pem", ".yaml")]


def _wait(predicate: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_export_and_forget_one_of_two_users(daemon: Any) -> None:
    d: Daemon = daemon({}, env=ENV)
    d.stop()
    d.config.update(_config(d.tmp))
    d.config["upstreams"]["anthropic"]["api_key"] = "sk-ant-api03-UPSTREAM000000000000000000000000000000000000000000000f3a9"
    d.start()
    for _ in range(2):
        _request(d, ALICE_KEY, ALICE_IP)
        _request(d, BOB_KEY, BOB_IP)
    _request(d, "sk-ant-api03-WRONG", ALICE_IP, ok=False)
    d.stop()
    logs = d.tmp / "logs"
    # Nothing personal in clear, anywhere the trail wrote: sealed per subject.
    for path in _every_file(logs):
        data = path.read_bytes()
        for probe in (ALICE, BOB, ALICE_IP, "key-alice", "key-bob"):
            assert probe.encode() not in data, f"{path} holds {probe}"
    alice = _export(d, "--user-id", ALICE)
    bob = _export(d, "--user-id", BOB)
    # Two authentication_success events and two access records each.
    assert sorted(e["record"]["event"] for e in alice) == ["authentication_success"] * 2 + ["http_request"] * 2
    assert {e["record"]["user_id"] for e in alice} == {ALICE}
    assert {e["record"]["ip_address"] for e in alice} == {ALICE_IP}
    assert {e["record"]["api_key_id"] for e in alice} == {"key-alice"}
    assert {e["record"]["ip_address"] for e in bob} == {BOB_IP}
    # The wrong key's refusal has no user or key: its subject is the address.
    refused = _export(d, "--ip", ALICE_IP)
    assert [e["record"]["event"] for e in refused] == ["authentication_failure", "http_request"]
    assert _export(d, "--user-id", ALICE, "--since", "2999-01-01") == []

    result = _cli("privacy", "forget", "--config", str(d.config_path), "--user-id", ALICE)
    assert result.returncode == 0 and "key destroyed" in result.stdout, result.stderr
    forgot_ip = _cli("privacy", "forget", "--config", str(d.config_path), "--ip", ALICE_IP)
    assert forgot_ip.returncode == 0
    d.start()  # the daemon records the erasures it finds queued
    _wait(lambda: (logs / "audit.log").exists()
          and (logs / "audit.log").read_bytes().count(b"privacy_subject_erased") == 2)
    d.stop()
    assert _export(d, "--user-id", ALICE) == []
    assert _export(d, "--user-id", BOB) == bob
    assert "user_id=[personal]" in d.log()  # events still reach the daemon's log, without the person
    for path in _every_file(d.tmp):  # the daemon's own log included
        data = path.read_bytes()
        for probe in (ALICE, ALICE_IP, "key-alice"):
            assert probe.encode() not in data, f"{path} holds {probe}"
    for name in ("audit.log", "access.log"):
        files = [str(p) for p in logs.glob(f"{name}*")]
        check = _cli("audit", "verify", *files)
        assert check.returncode == 0, check.stderr
    erasures = [json.loads(line) for line in (logs / "audit.log").read_text().splitlines()
                if "privacy_subject_erased" in line]
    assert all(e["subject"] and len(e["subject"]) == 32 and e["kind"] in ("user_id", "ip_address") for e in erasures)

    # Rotating the master key rewraps the keys, rewrites no record, and bob's export still works.
    before = {p: p.read_bytes() for p in logs.iterdir()}
    d.config["privacy"]["keys"]["master_key"] = "${CCPROXY_NEW_MASTER}"
    d.config["privacy"]["keys"]["old_master_keys"] = ["${CCPROXY_MASTER_KEY}"]
    d.write_config()
    both = {**ENV, "CCPROXY_NEW_MASTER": NEW_MASTER}
    rotated = _cli("privacy", "rotate-master-key", "--config", str(d.config_path), env=both)
    assert rotated.returncode == 0 and "keys rewrapped" in rotated.stdout, rotated.stderr
    assert {p: p.read_bytes() for p in logs.iterdir()} == before
    d.config["privacy"]["keys"].pop("old_master_keys")
    d.write_config()
    only_new = {"CCPROXY_NEW_MASTER": NEW_MASTER, "CCPROXY_MASTER_KEY": ""}
    result = _cli("privacy", "export", "--config", str(d.config_path), "--user-id", BOB, env=only_new)
    assert result.returncode == 0, result.stderr
    assert [json.loads(line) for line in result.stdout.splitlines()] == bob
