"""Which layers take part in which step, given the config."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock

from ccproxy import runtime as runtime_module
from ccproxy import service
from ccproxy.blocklist import BlockList
from ccproxy.config import Config, parse
from ccproxy.context import Layer
from ccproxy.forward import Forwarder
from ccproxy.runtime import Deps, LayerFactory, Runtime, build


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


class Named(Layer):
    def __init__(self, name: str) -> None:
        self.name = name


def test_a_reload_hands_each_layer_its_namesake_wherever_it_now_stands(monkeypatch: pytest.MonkeyPatch) -> None:
    handed: dict[str, Layer | None] = {}

    def factory(name: str) -> LayerFactory:
        def make(config: Config, deps: Deps, previous: Layer | None) -> Layer:
            handed[name] = previous
            return Named(name)
        return make

    config = parse({"server": {"tls": {"enabled": False}}})
    clock = Clock()
    deps = Deps(clock, BlockList())
    monkeypatch.setattr(runtime_module, "layer_factories", lambda: {"a": factory("a"), "b": factory("b")})
    first = build(config, deps, Forwarder(clock))
    assert handed == {"a": None, "b": None}
    # A layer added in front and the others reordered: by position each would get the wrong one.
    monkeypatch.setattr(runtime_module, "layer_factories",
                        lambda: {"new": factory("new"), "b": factory("b"), "a": factory("a")})
    second = build(config, deps, Forwarder(clock), first)
    assert handed == {"new": None, "b": first.named["b"], "a": first.named["a"]}
    assert [layer.name for layer in second.layers if isinstance(layer, Named)] == ["new", "b", "a"]


def test_the_real_layers_are_named_in_request_order() -> None:
    assert list(runtime_module.layer_factories()) == ["network", "auth", "emergency", "detectors", "limits", "content"]


def test_constructing_the_service_connects_and_starts_nothing() -> None:
    clock = Clock()
    config = parse({"server": {"tls": {"enabled": False}},
                    "security": {"rate_limiting": {"enabled": True, "per_ip": {"requests_per_minute": 60}}}})
    svc = service.ProxyService("unused.yaml", config, clock)
    assert clock.getDelayedCalls() == [] and svc.holder.current.layers == ()
    assert svc.config is config
    # What startService builds from the same config does start the limiter's housekeeping timer.
    built = build(svc.config, svc.deps, svc.holder.current.forwarder)
    assert len(clock.getDelayedCalls()) == 1
    built.stop()
    assert clock.getDelayedCalls() == []
