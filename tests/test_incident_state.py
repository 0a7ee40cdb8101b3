"""Operator blocks, emergency state and the rotated-keys overlay, in memory with a fake clock."""

from __future__ import annotations

import hashlib
import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import task

from ccproxy.admin.state import IncidentState
from ccproxy.blocklist import BlockList
from ccproxy.config import ConfigError, load, parse
from ccproxy.config import overlay as keyfile


def state(tmp_path: Path, clock: task.Clock, blocklist: BlockList | None = None) -> IncidentState:
    s = IncidentState(str(tmp_path), blocklist or BlockList(), clock)
    s.load()
    return s


def test_blocklist_ranges_and_listeners() -> None:
    told: list[Any] = []
    bl = BlockList()
    bl.listeners.append(told.append)
    bl.block_network(ipaddress.ip_network("10.1.0.0/16"), 100.0)
    bl.block_network(ipaddress.ip_network("192.0.2.7/32"), 50.0)
    assert bl.is_blocked("10.1.200.3", 10.0) and not bl.is_blocked("10.2.0.1", 10.0)
    assert bl.is_blocked("192.0.2.7", 10.0) and not bl.is_blocked("2001:db8::1", 10.0)
    assert told == [ipaddress.ip_network("10.1.0.0/16"), "192.0.2.7"]
    assert not bl.is_blocked("10.1.200.3", 100.0)  # over at its deadline
    assert bl.unblock_network(ipaddress.ip_network("192.0.2.7/32"))
    assert not bl.is_blocked("192.0.2.7", 10.0)


def test_block_expires_and_is_reported(tmp_path: Path, seen_events: list[dict[str, Any]]) -> None:
    clock = task.Clock()
    clock.advance(1000)
    s = state(tmp_path, clock)
    s.start()
    block = s.block("203.0.113.9", 60.0, "scan", "uid=0 pid=1")
    assert block.until == 1060.0 and s.blocklist.is_blocked("203.0.113.9", clock.seconds())
    clock.advance(59)
    assert [b.target for b in s.list()] == ["203.0.113.9"]
    clock.advance(1)
    assert s.list() == [] and not s.blocklist.is_blocked("203.0.113.9", clock.seconds())
    names = [(e["ccproxy_event"], e.get("reason")) for e in seen_events]
    assert ("ip_blocked", "scan") in names and ("ip_unblocked", "block expired") in names
    s.stop()


def test_blocks_and_emergency_survive_a_restart(tmp_path: Path) -> None:
    clock = task.Clock()
    clock.advance(5000)
    s = state(tmp_path, clock)
    s.block("::ffff:198.51.100.4", None, "abuse", "uid=0 pid=1")  # mapped: kept as the IPv4 address
    s.block("2001:db8::/32", 3600.0, "range", "uid=0 pid=1")
    s.block("192.0.2.1", 10.0, "short", "uid=0 pid=1")
    assert s.set_emergency(True, "uid=0 pid=2") and not s.set_emergency(True, "uid=0 pid=2")
    clock.advance(20)  # the short block is over before the restart
    again = state(tmp_path, clock)
    assert {b.target for b in again.list()} == {"198.51.100.4", "2001:db8::/32"}
    assert again.blocklist.is_blocked("198.51.100.4", clock.seconds())
    assert again.blocklist.is_blocked("2001:db8:5::1", clock.seconds())
    assert again.emergency and again.emergency_by == "uid=0 pid=2"
    assert again.unblock("198.51.100.4", "uid=0 pid=3") and not again.unblock("198.51.100.4", "uid=0 pid=3")
    third = state(tmp_path, clock)
    assert {b.target for b in third.list()} == {"2001:db8::/32"}


def test_unwritable_state_refuses_the_change(tmp_path: Path) -> None:
    clock = task.Clock()
    (tmp_path / "file").write_text("")
    s = IncidentState(str(tmp_path / "file" / "below"), BlockList(), clock)
    with pytest.raises(OSError):
        s.block("192.0.2.1", None, "x", "uid=0")
    assert not s.blocklist.is_blocked("192.0.2.1", 0.0) and not s.blocks
    with pytest.raises(OSError):
        s.set_emergency(True, "uid=0")
    assert not s.emergency


def test_damaged_state_file_is_set_aside(tmp_path: Path) -> None:
    (tmp_path / "incident.json").write_text("{not json")
    s = state(tmp_path, task.Clock())
    assert not s.blocks and not s.emergency
    assert (tmp_path / "incident.damaged").exists()


def test_target_must_be_an_address_or_range(tmp_path: Path) -> None:
    s = state(tmp_path, task.Clock())
    with pytest.raises(ValueError, match="not an IP address or CIDR range"):
        s.block("example.com", None, "x", "uid=0")


def _keys_config(tmp_path: Path, digest: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps({
        "server": {"tls": {"enabled": False}},
        "upstreams": {"anthropic": {"api_key": "sk-ant-x"}, "openai": {"api_key": "sk-x"}},
        "admin": {"state_dir": "state", "socket": "admin.sock"},
        "security": {"auth": {"enabled": True, "api_keys": [
            {"id": "a", "tier": "gold", "user_id": "u1", "key_sha256": digest, "allowed_ips": ["10.0.0.0/8"]},
            {"id": "b", "key_sha256": "b" * 64},
        ]}},
    }))
    return path


def test_overlay_adds_the_new_key_and_caps_the_old_ones(tmp_path: Path) -> None:
    old = hashlib.sha256(b"old").hexdigest()
    path = _keys_config(tmp_path, old)
    config = load(str(path))
    assert config.admin.state_dir == str(tmp_path / "state")
    r1 = keyfile.Rotation("a", "1" * 64, 100.0, 200.0, keyfile.live_digests(config.auth.keys, "a", 100.0))
    keyfile.write_overlay(keyfile.overlay_path(config), [r1], 100.0)
    rotated = load(str(path))
    a_keys = [k for k in rotated.auth.keys if k.id == "a"]
    assert [k.sha256.reveal() for k in a_keys] == [old, "1" * 64]
    assert a_keys[0].expires == 200.0 and a_keys[1].expires is None and a_keys[1].created == 100.0
    assert a_keys[1].tier == "gold" and a_keys[1].user_id == "u1" and a_keys[1].allowed_ips == a_keys[0].allowed_ips
    # Applying the new rotation to the running config gives what a reload reads from the file.
    assert keyfile.apply(config, [r1]) == rotated
    # A second rotation retires the first new key; once its grace is over, the first record goes.
    r2 = keyfile.Rotation("a", "2" * 64, 300.0, 400.0, keyfile.live_digests(rotated.auth.keys, "a", 300.0))
    assert r2.supersedes == ("1" * 64,)
    keyfile.write_overlay(keyfile.overlay_path(config), [r1, r2], 300.0)
    assert len(keyfile.read_overlay(keyfile.overlay_path(config))) == 2
    keyfile.write_overlay(keyfile.overlay_path(config), [r1, r2], 400.0)
    assert [r.sha256 for r in keyfile.read_overlay(keyfile.overlay_path(config))] == ["2" * 64]


def test_damaged_overlay_is_a_config_error(tmp_path: Path) -> None:
    path = _keys_config(tmp_path, "a" * 64)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "rotated-keys.json").write_text('{"rotations": [{"key_id": 1}]}')
    with pytest.raises(ConfigError, match="rotated-keys overlay .* is damaged"):
        load(str(path))


@pytest.mark.parametrize(("admin", "security", "path"), [
    ({"metrics": {"listen": "nohost"}}, {}, "admin.metrics.listen"),
    ({"metrics": {"listen": "127.0.0.1:70000"}}, {}, "admin.metrics.listen"),
    ({"sockett": "/x"}, {}, "admin.sockett"),
    ({}, {"emergency": {"allowed_ips": ["10.0.0.300"]}}, "security.emergency.allowed_ips[0]"),
    ({}, {"emergency": {"require_auth": "yes"}}, "security.emergency.require_auth"),
])
def test_admin_and_emergency_config_faults_name_their_path(admin: Any, security: Any, path: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse({"server": {"tls": {"enabled": False}}, "admin": admin, "security": security})
    assert e.value.path == path


def test_admin_defaults_suit_the_systemd_unit() -> None:
    config = parse({"server": {"tls": {"enabled": False}}})
    assert config.admin.socket == "/run/ccproxy/admin.sock"
    assert config.admin.state_dir == "/var/lib/ccproxy"
    assert not config.admin.metrics.enabled
    assert config.emergency.require_auth and config.emergency.close_connections
    assert parse({"server": {"tls": {"enabled": False}}, "admin": {"enabled": False}}).admin.socket is None


class FakeRemote:
    """What another instance shared through Redis."""

    def __init__(self) -> None:
        self.shared: dict[str, Any] | None = None
        self.published: list[dict[str, Any]] = []

    def publish(self, value: dict[str, Any]) -> None:
        self.published.append(value)

    async def fetch(self) -> dict[str, Any] | None:
        return self.shared


def test_emergency_switch_follows_a_later_switch_elsewhere(tmp_path: Path, seen_events: list[dict[str, Any]]) -> None:
    import asyncio

    clock = task.Clock()
    clock.advance(100)
    s = state(tmp_path, clock)
    s.remote = remote = FakeRemote()
    closed: list[bool] = []
    s.on_emergency.append(lambda: closed.append(True))
    assert s.set_emergency(True, "uid=0 pid=1")
    assert remote.published == [{"enabled": True, "since": 100.0, "by": "uid=0 pid=1", "changed": 100.0}]
    # An older state in Redis (our own publish not landed yet) changes nothing.
    remote.shared = {"enabled": False, "since": None, "by": "uid=0 pid=9", "changed": 50.0}
    asyncio.run(s.follow())
    assert s.emergency
    # A later switch elsewhere is adopted, saved, and reported as learned.
    remote.shared = {"enabled": False, "since": None, "by": "uid=0 pid=9", "changed": 150.0}
    asyncio.run(s.follow())
    assert not s.emergency and s.emergency_by == "uid=0 pid=9"
    assert state(tmp_path, clock).emergency is False
    remote.shared = {"enabled": True, "since": 160.0, "by": "uid=0 pid=8", "changed": 160.0}
    asyncio.run(s.follow())
    assert s.emergency and closed == [True, True]
    learned = [e for e in seen_events if e["ccproxy_event"] == "emergency_mode" and e.get("via") == "redis"]
    assert [e["enabled"] for e in learned] == [False, True]
    remote.shared = {"enabled": "garbage"}
    asyncio.run(s.follow())
    assert s.emergency
