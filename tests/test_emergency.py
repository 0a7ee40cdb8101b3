"""Emergency mode's layer in memory: the profile applies from the next request, and only while on."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import task

from ccproxy.admin.emergency import EmergencyLayer, build_layer
from ccproxy.admin.state import IncidentState
from ccproxy.blocklist import BlockList
from ccproxy.config import parse
from ccproxy.context import Identity, Layer
from ccproxy.errors import ApiError
from ccproxy.runtime import Deps
from tests.test_limits_layer import make_ctx


def layer(tmp_path: Path, **emergency: Any) -> tuple[EmergencyLayer, IncidentState, task.Clock]:
    clock = task.Clock()
    clock.advance(1000)
    config = parse({"server": {"tls": {"enabled": False}}, "security": {"emergency": emergency}})
    blocklist = BlockList()
    incident = IncidentState(str(tmp_path), blocklist, clock)
    built = build_layer(config, Deps(reactor=clock, blocklist=blocklist, incident=incident), None)
    assert isinstance(built, EmergencyLayer)
    return built, incident, clock


def status(layer: EmergencyLayer, ip: str = "10.1.1.1", key: str | None = "k1") -> int:
    ctx = make_ctx(ip=ip, identity=Identity(key_id=key) if key else None)
    try:
        asyncio.run(layer.check(ctx))
    except ApiError as e:
        return e.status
    return 200


def test_off_until_switched_on(tmp_path: Path) -> None:
    emergency, incident, _ = layer(tmp_path, allowed_ips=["192.0.2.0/24"])
    assert status(emergency, key=None) == 200
    incident.set_emergency(True, "uid=0")
    assert status(emergency, key=None) == 403  # not a listed address
    assert status(emergency, ip="192.0.2.5", key=None) == 401  # listed, but no credential
    assert status(emergency, ip="192.0.2.5") == 200
    incident.set_emergency(False, "uid=0")
    assert status(emergency, key=None) == 200


def test_listed_keys_and_the_per_address_limit(tmp_path: Path) -> None:
    emergency, incident, clock = layer(tmp_path, allowed_keys=["ops"], requests_per_minute_per_ip=10)
    incident.set_emergency(True, "uid=0")
    assert status(emergency, key="app") == 403
    assert [status(emergency, key="ops") for _ in range(2)] == [200, 429]  # burst: a tenth of 10
    assert status(emergency, ip="10.1.1.2", key="ops") == 200  # per address
    clock.advance(6)  # one more every 6 s
    assert status(emergency, key="ops") == 200


def test_no_limit_of_its_own_when_false(tmp_path: Path) -> None:
    emergency, incident, _ = layer(tmp_path, requests_per_minute_per_ip=False)
    incident.set_emergency(True, "uid=0")
    assert [status(emergency) for _ in range(100)] == [200] * 100


def test_without_incident_state_the_layer_does_nothing() -> None:
    config = parse({"server": {"tls": {"enabled": False}}})
    assert type(build_layer(config, Deps(reactor=task.Clock(), blocklist=BlockList()), None)) is Layer


@pytest.mark.parametrize("value", ["x", 0, True])
def test_bad_limit_names_its_path(value: Any) -> None:
    from ccproxy.config import ConfigError

    with pytest.raises(ConfigError) as e:
        parse({"server": {"tls": {"enabled": False}}, "security": {"emergency": {"requests_per_minute_per_ip": value}}})
    assert e.value.path == "security.emergency.requests_per_minute_per_ip"
