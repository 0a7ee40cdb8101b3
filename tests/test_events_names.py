"""Observers registered for some event names get those events only; the rest still get all."""

from __future__ import annotations

from typing import Any

from ccproxy import events
from ccproxy.admin.refusals import HttpRefusals


def test_named_observer_gets_only_its_events_and_whole_observer_gets_all() -> None:
    some: list[dict[str, Any]] = []
    every: list[dict[str, Any]] = []
    events.add_observer(some.append, frozenset({"request_too_large"}))
    try:
        events.emit("authentication_success", key_id="k1")
        events.emit("request_too_large", "warning", ip_address="192.0.2.1", status=413)
        assert [e["ccproxy_event"] for e in some] == ["request_too_large"]
        assert some[0]["status"] == 413 and some[0]["severity"] == "warning"
        # An observer added after names were looked up is still found.
        events.add_observer(every.append)
        try:
            events.emit("authentication_success", key_id="k2")
            events.emit("request_too_large", ip_address="192.0.2.2")
        finally:
            events.remove_observer(every.append)
        assert [e["ccproxy_event"] for e in every] == ["authentication_success", "request_too_large"]
        assert len(some) == 2
    finally:
        events.remove_observer(some.append)
    events.emit("request_too_large", ip_address="192.0.2.3")
    assert len(some) == 2 and len(every) == 2


def test_removing_an_unknown_observer_is_harmless() -> None:
    seen: list[dict[str, Any]] = []
    events.remove_observer(seen.append)
    events.emit("request_too_large", ip_address="192.0.2.4")
    assert seen == []


class _Holder:
    current: Any = None


def test_http_refusals_names_every_event_it_acts_on() -> None:
    """Registered for `EVENTS` only: every event it counts must be among them."""
    counted: list[str] = []

    class Layer:
        def count_refusal(self, ip: str) -> None:
            counted.append(ip)

    class Network:
        trusted_proxies = ()

    class Config:
        network = Network()

    holder = _Holder()
    holder.current = type("Runtime", (), {"config": Config(), "layers": [Layer()]})()
    refusals = HttpRefusals(holder)
    events.add_observer(refusals, HttpRefusals.EVENTS)
    try:
        events.emit("invalid_request", ip_address="192.0.2.10")
        events.emit("request_too_large", ip_address="192.0.2.11")
        events.emit("request_timeout", ip_address="192.0.2.12", status=408)
        events.emit("authentication_success", ip_address="192.0.2.13")
    finally:
        events.remove_observer(refusals)
    assert counted == ["192.0.2.10", "192.0.2.11", "192.0.2.12"]
