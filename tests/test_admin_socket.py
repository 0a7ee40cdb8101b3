"""The admin socket's protocol and commands in memory: StringTransport, a fake clock, a real runtime."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.internet import task
from twisted.internet.testing import StringTransport

from ccproxy.admin.server import Admin, AdminProtocol
from ccproxy.admin.state import IncidentState
from ccproxy.blocklist import BlockList
from ccproxy.config import parse
from ccproxy.forward import Forwarder
from ccproxy.runtime import Deps, RuntimeHolder, build


def admin(tmp_path: Path, security: dict[str, Any] | None = None) -> tuple[Admin, task.Clock]:
    clock = task.Clock()
    clock.advance(1_000_000)
    config = parse({"server": {"tls": {"enabled": False}}, "admin": {"state_dir": str(tmp_path)},
                    "security": security or {}})
    blocklist = BlockList()
    deps = Deps(reactor=clock, blocklist=blocklist, incident=IncidentState(str(tmp_path), blocklist, clock))
    holder = RuntimeHolder(build(config, deps, Forwarder(clock)))
    rebuilt: list[Any] = []

    def rebuild(new: Any) -> None:
        rebuilt.append(new)
        holder.current = build(new, deps, holder.current.forwarder, holder.current)

    return Admin(holder, deps, deps.incident, clock, "/etc/ccproxy/config.yaml", rebuild=rebuild), clock


def ask(a: Admin, line: bytes) -> dict[str, Any]:
    protocol = AdminProtocol(a)
    transport = StringTransport()
    protocol.makeConnection(transport)  # StringTransport has no socket: the peer is "unknown"
    protocol.dataReceived(line + b"\n")
    assert transport.disconnecting
    answer: dict[str, Any] = json.loads(transport.value())
    return answer


def run(a: Admin, command: str, **args: Any) -> dict[str, Any]:
    return ask(a, json.dumps({"command": command, "args": args}).encode())


def test_requests_that_are_not_commands(tmp_path: Path) -> None:
    a, _ = admin(tmp_path)
    assert ask(a, b"{not json") == {"ok": False, "error": "the request is not JSON"}
    assert ask(a, b"[1, 2]") == {"ok": False, "error": "expected a JSON object with a command"}
    assert run(a, "reboot") == {"ok": False, "error": "unknown command 'reboot'"}
    assert ask(a, b"x" * 70_000) == {"ok": False, "error": "request too long"}


def test_block_list_unblock(tmp_path: Path, seen_events: list[dict[str, Any]]) -> None:
    a, clock = admin(tmp_path)
    done = run(a, "block-ip", target="198.51.100.0/24", duration="10m", reason="scanner")
    assert done["ok"] and done["result"]["until"] == clock.seconds() + 600
    assert a.deps.blocklist.is_blocked("198.51.100.77", clock.seconds())
    assert run(a, "block-ip", target="198.51.100.1", duration="soon")["error"].startswith("invalid duration")
    assert run(a, "block-ip", target="")["error"] == "missing or invalid target"
    listed = run(a, "list-blocks")["result"]["blocks"]
    assert [(b["target"], b["reason"], b["by"]) for b in listed] == [("198.51.100.0/24", "scanner", "unknown")]
    assert run(a, "unblock-ip", target="198.51.100.0/24")["ok"]
    assert not a.deps.blocklist.is_blocked("198.51.100.77", clock.seconds())
    assert run(a, "unblock-ip", target="198.51.100.0/24") == {"ok": False, "error": "198.51.100.0/24 is not blocked"}
    outcomes = [(e["command"], e["outcome"]) for e in seen_events if e["ccproxy_event"] == "admin_command"]
    assert outcomes == [("block-ip", "done"), ("block-ip", "refused"), ("block-ip", "refused"),
                        ("list-blocks", "done"), ("unblock-ip", "done"), ("unblock-ip", "refused")]


def test_emergency_and_status(tmp_path: Path) -> None:
    a, clock = admin(tmp_path)
    status = run(a, "status")["result"]
    assert status["emergency"] is False and status["state_backend"] == "none" and status["ready"] is False
    assert len(status["config_sha256"]) == 64
    assert run(a, "emergency", action="restart")["error"] == "emergency: give --enable, --disable or --status"
    on = run(a, "emergency", action="enable")["result"]
    assert on == {"emergency": True, "since": clock.seconds(), "by": "unknown", "changed": True}
    assert run(a, "emergency", action="enable")["result"]["changed"] is False
    assert run(a, "status")["result"]["emergency"] is True
    assert json.loads((tmp_path / "incident.json").read_text())["emergency"]["enabled"] is True
    assert run(a, "emergency", action="disable")["result"]["emergency"] is False


def test_rotate_key_refusals_and_the_new_runtime(tmp_path: Path) -> None:
    a, clock = admin(tmp_path)
    assert run(a, "rotate-key", key_id="k")["error"] == "rotate-key needs security.auth enabled with type api_key"
    a, clock = admin(tmp_path, {"auth": {"enabled": True, "api_keys": [{"id": "k", "key_sha256": "ab" * 32}]}})
    assert run(a, "rotate-key", key_id="other")["error"] == "no API key with id 'other' in the config"
    assert run(a, "rotate-key", key_id="k", grace="-1h")["error"].startswith("invalid duration")
    done = run(a, "rotate-key", key_id="k", grace="1h")["result"]
    assert done["key"].startswith("ccp_") and done["grace_until"] == clock.seconds() + 3600
    keys = a.holder.current.config.auth.keys
    assert [(k.id, k.expires) for k in keys] == [("k", clock.seconds() + 3600), ("k", None)]
    assert done["key"] not in (tmp_path / "rotated-keys.json").read_text()


def test_a_client_that_sends_nothing_is_cut(tmp_path: Path) -> None:
    a, clock = admin(tmp_path)
    protocol = AdminProtocol(a)
    transport = StringTransport()
    protocol.makeConnection(transport)
    clock.advance(9.9)
    assert not transport.disconnecting
    clock.advance(0.1)
    assert transport.disconnecting and transport.value() == b""


def test_an_operators_reason_is_kept_printable(tmp_path: Path) -> None:
    a, _ = admin(tmp_path)
    done = run(a, "block-ip", target="192.0.2.1", reason="bad\x1b[31m\nactor")
    assert done["result"]["reason"] == "bad\\x1b[31m\\x0aactor"
