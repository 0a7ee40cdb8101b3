"""The real daemon writing its audit trail to files and to a real rsyslogd."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import pytest

from ccproxy.audit.verify import verify
from tests.support.clients import anthropic_client
from tests.support.daemon import Daemon
from tests.support.rsyslog import Rsyslog
from tests.support.waiting import wait_until

HMAC_KEY = "audit-e2e-hmac-key-5f0e1d2c3b4a69788796a5b4"
UPSTREAM_KEY = "sk-ant-api03-E2EUPSTREAMKEY000000000000000000000000000000000000000000f3a9"
CLIENT_KEY = "sk-ant-api03-E2ECLIENTKEY1111111111111111111111111111111111111111111c0de"
WRONG_KEY = "ccp-wrong-client-key-2222222222222222"


@pytest.fixture
def rsyslog(tmp_path: Path) -> Iterator[Rsyslog]:
    server = Rsyslog(tmp_path)
    yield server
    server.stop()


def _syslog(r: Rsyslog, tmp: Path, protocol: str, app: str, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "syslog", "protocol": protocol, "app_name": app, "facility": "local4",
                           "spool_path": str(tmp / f"spool-{app}"), **extra}
    if protocol == "unix":
        out["path"] = r.socket
    else:
        out.update(host="127.0.0.1", port=r.tcp_port if protocol == "tcp" else r.udp_port)
    return out


def _config(tmp: Path, outputs: list[dict[str, Any]], timeout: int = 600) -> dict[str, Any]:
    return {
        "security": {"audit": {"hmac_key": "${CCPROXY_AUDIT_HMAC_KEY}", "outputs": [
            {"type": "file", "path": str(tmp / "audit.log"), "flush_interval": "50ms"}, *outputs]}},
        "upstreams": {"anthropic": {"api_key": UPSTREAM_KEY, "read_timeout": f"{timeout}s"}},
    }


def _reloads(d: Daemon, count: int) -> None:
    """Each reload is one configuration_change event."""
    config = d.config
    for _ in range(count):
        timeout = config["upstreams"]["anthropic"]["read_timeout"]
        config["upstreams"]["anthropic"]["read_timeout"] = f"{int(timeout[:-1]) + 1}s"
        assert "config reloaded" in d.reload(config)


def _by_app(r: Rsyslog, app: str, checkpoints: bool = False) -> list[dict[str, Any]]:
    """The records one output sent (its checkpoints too, if asked)."""
    out = []
    for fields in r.lines():
        if len(fields) == 6 and fields[3] == app:
            record = json.loads(fields[5][fields[5].find("{"):])
            if checkpoints or record.get("type") != "checkpoint":
                out.append(record)
    return out


def _first_seen(records: list[dict[str, Any]]) -> list[int]:
    """Sequence numbers in arrival order, a duplicate (sent again after a reconnect) counted once."""
    seen: list[int] = []
    for record in records:
        if record["seq"] not in seen:
            seen.append(record["seq"])
    return seen


ENV = {"CCPROXY_AUDIT_HMAC_KEY": HMAC_KEY}


def test_rsyslog_receives_every_transport_and_no_output_holds_a_secret(
        daemon: Any, rsyslog: Rsyslog, tmp_path: Path) -> None:
    rsyslog.start()
    config = _config(tmp_path, [
        {"type": "file", "path": str(tmp_path / "access.log"), "records": "access", "flush_interval": "50ms"},
        _syslog(rsyslog, tmp_path, "tcp", "ccp-tcp"),
        _syslog(rsyslog, tmp_path, "udp", "ccp-udp"),
        _syslog(rsyslog, tmp_path, "unix", "ccp-unix"),
        _syslog(rsyslog, tmp_path, "tcp", "ccp-access", records="access"),
    ])
    config["security"]["auth"] = {"enabled": True, "api_keys": [{"id": "key-e2e", "key": CLIENT_KEY}]}
    d = daemon(config, env=ENV)
    message = {"model": "claude-sonnet-4-6", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    anthropic_client(d, CLIENT_KEY).messages.create(**message)
    with pytest.raises(anthropic.AuthenticationError):
        anthropic_client(d, WRONG_KEY).messages.create(**message)
    wait_until(lambda: {"authentication_success", "authentication_failure"} <= {r["event"] for r in _by_app(rsyslog, "ccp-tcp")})
    auth_events = _by_app(rsyslog, "ccp-tcp")
    assert [r["event"] for r in auth_events] == ["authentication_success", "authentication_failure"]
    assert auth_events[0]["api_key_id"] == "key-e2e" and auth_events[0]["ip_address"] == "127.0.0.1"
    assert auth_events[1]["request_id"].startswith("req_")
    _reloads(d, 3)

    for app in ("ccp-tcp", "ccp-udp", "ccp-unix"):
        wait_until(lambda app=app: len(_by_app(rsyslog, app)) >= 5)
        records = _by_app(rsyslog, app)
        assert [r["event"] for r in records[2:]] == ["configuration_change"] * 3
        assert [r["seq"] for r in records] == [1, 2, 3, 4, 5]
        assert records[2]["changed"] == ["upstreams.anthropic.read_timeout"]
    for fields in rsyslog.lines():
        if fields[3] not in ("ccp-tcp", "ccp-udp", "ccp-unix"):
            continue
        event = json.loads(fields[5][fields[5].find("{"):])["event"]
        severity = {"configuration_change": "notice", "authentication_success": "info"}.get(event, "warning")
        # Network outputs speak RFC 5424 (version 1, the event as MSGID); the local socket the local
        # syslog(3) format, which the receiver parses with the tag as app-name.
        version, msgid = ("0", "-") if fields[3] == "ccp-unix" else ("1", event)
        assert fields[:5] == [version, "local4", severity, fields[3], msgid]
    wait_until(lambda: any(r["path"] == "/v1/messages" for r in _by_app(rsyslog, "ccp-access")))
    access = [r for r in _by_app(rsyslog, "ccp-access") if r["path"] == "/v1/messages"]
    assert [(r["status"], r["api_key_id"]) for r in access] == [(200, "key-e2e"), (401, None)]
    assert access[0]["event"] == "http_request" and access[0]["method"] == "POST"

    d.stop()
    file_records = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    assert file_records == _by_app(rsyslog, "ccp-tcp")  # the same sealed records everywhere
    assert verify([str(tmp_path / "audit.log"), str(tmp_path / "audit.log.checkpoints")], HMAC_KEY.encode()).ok
    assert verify([str(rsyslog.out)], HMAC_KEY.encode(), received=True).ok is False  # mixed apps: not one chain
    received = tmp_path / "received-tcp.log"  # what the receiver wrote for one output, header and all
    received.write_text("".join(f"{'|'.join(f)}\n" for f in rsyslog.lines() if f[3] == "ccp-tcp"))
    report = verify([str(received)], HMAC_KEY.encode(), received=True)
    assert report.ok and "checkpoints agree" in report.message, report.message  # the shutdown's, at least
    _scan_for_secrets(tmp_path, [HMAC_KEY, UPSTREAM_KEY, CLIENT_KEY, WRONG_KEY])


def _scan_for_secrets(tmp: Path, secrets: list[str]) -> None:
    """Every file the trail or the receiver wrote (not the daemon's own log, which is not ours)."""
    scanned = 0
    for path in tmp.rglob("*"):
        if not path.is_file() or path.suffix in (".pem", ".yaml") or path.name.startswith("ccproxy-"):
            continue
        data = path.read_bytes()
        scanned += 1
        for secret in secrets:
            for probe in (secret, secret[8:40], json.dumps(secret)[1:-1]):
                assert probe.encode() not in data, f"{path} holds a secret"
    assert scanned >= 6


def test_a_receiver_that_goes_away_and_comes_back_gets_everything_in_order(
        daemon: Any, rsyslog: Rsyslog, tmp_path: Path) -> None:
    rsyslog.start()
    config = _config(tmp_path, [_syslog(rsyslog, tmp_path, "tcp", "ccp-tcp", queue_size=2)])
    d = daemon(config, env=ENV)
    _reloads(d, 2)
    wait_until(lambda: len(_by_app(rsyslog, "ccp-tcp")) >= 2)
    rsyslog.stop()
    rsyslog.hold_port()
    # Records sent before the daemon sees the connection go would be lost with it: wait until it has.
    lost = f"audit syslog tcp 127.0.0.1:{rsyslog.tcp_port}: connection lost"
    wait_until(lambda: lost in d.log(), what="the daemon to see the receiver gone")
    _reloads(d, 4)  # the memory queue takes two; the rest (and any resent in flight) go to the spool
    spool = tmp_path / "spool-ccp-tcp"
    wait_until(lambda: spool.exists() and spool.read_bytes().count(b"\n") >= 2, what="records in the spool")
    rsyslog.start()
    _reloads(d, 1)
    wait_until(lambda: set(_first_seen(_by_app(rsyslog, "ccp-tcp"))) >= set(range(1, 8)))
    assert _first_seen(_by_app(rsyslog, "ccp-tcp")) == list(range(1, 8))


def test_records_spooled_at_shutdown_are_delivered_after_a_restart(
        daemon: Any, rsyslog: Rsyslog, tmp_path: Path) -> None:
    rsyslog.hold_port()  # the receiver is not running at all
    config = _config(tmp_path, [_syslog(rsyslog, tmp_path, "tcp", "ccp-tcp", queue_size=2)])
    d = daemon(config, env=ENV)
    _reloads(d, 5)
    d.stop()
    assert ": connected" not in d.log()
    spool = tmp_path / "spool-ccp-tcp"
    assert spool.read_bytes().count(b"\n") == 6, d.log()  # five records and the shutdown's checkpoint
    rsyslog.start()
    d.start()
    _reloads(d, 1)
    wait_until(lambda: set(_first_seen(_by_app(rsyslog, "ccp-tcp"))) >= set(range(1, 7)))
    assert _first_seen(_by_app(rsyslog, "ccp-tcp")) == list(range(1, 7))
    assert spool.read_bytes() == b""
    d.stop()
    assert verify([str(tmp_path / "audit.log")], HMAC_KEY.encode()).ok
