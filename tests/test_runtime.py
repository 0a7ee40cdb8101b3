"""Which layers take part in which step, given the config."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock

from ccproxy.blocklist import BlockList
from ccproxy.config import parse
from ccproxy.forward import Forwarder
from ccproxy.runtime import Deps, Runtime, build


def runtime(security: dict[str, Any] | None = None, **server: Any) -> Runtime:
    config = parse({"server": {"tls": {"enabled": False}, **server}, **({"security": security} if security else {})})
    clock = Clock()
    return build(config, Deps(clock, BlockList()), Forwarder(clock))


def names(layers: tuple[Any, ...]) -> list[str]:
    return [type(layer).__name__ for layer in layers]


def test_layers_with_nothing_configured_take_no_part() -> None:
    rt = runtime()
    assert names(rt.head_checkers) == [] and names(rt.body_checkers) == []
    assert names(rt.filterers) == []
    assert names(rt.decorators) == ["NetworkLayer"]  # the default security headers


def test_configured_features_bring_their_layers_back() -> None:
    rt = runtime({
        "rate_limiting": {"enabled": True, "per_ip": {"requests_per_minute": 60}},
        "request_validation": {"enabled": True},
        "response_sanitization": {"enabled": True},
        "ip_blacklist": {"auto_block": {"enabled": True, "threshold": 100, "duration": "1h"}},
    }, trusted_proxies=["10.0.0.0/8"], security_headers={"enabled": False})
    # Addresses and limits decide from the head; only content needs the body.
    assert names(rt.head_checkers) == ["NetworkLayer", "LimitsLayer"]
    assert names(rt.body_checkers) == ["ContentLayer"]
    assert names(rt.filterers) == ["ContentLayer"]
    assert names(rt.decorators) == []
    assert names(rt.completers) == ["LimitsLayer"]  # counting refused requests towards auto-blocks
