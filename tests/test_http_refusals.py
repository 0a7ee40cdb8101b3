"""Requests the HTTP layer refuses count towards auto-blocking: which refusals count, for which address,
and never for a trusted proxy that speaks for many clients."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from ccproxy.admin.refusals import HttpRefusals
from ccproxy.config import parse


class CountingLayer:
    def __init__(self) -> None:
        self.counted: list[str] = []

    def count_refusal(self, ip: str) -> None:
        self.counted.append(ip)


def _refusals(trusted: list[str] | None = None) -> tuple[HttpRefusals, CountingLayer, SimpleNamespace]:
    server: dict[str, Any] = {"tls": {"enabled": False}}
    if trusted is not None:
        server["trusted_proxies"] = trusted
    layer = CountingLayer()
    runtime = SimpleNamespace(config=parse({"server": server}, environ={}), layers=[object(), layer])
    holder = SimpleNamespace(current=runtime)
    return HttpRefusals(holder), layer, holder


def test_refusals_of_the_http_layer_count_for_their_address() -> None:
    refusals, layer, _ = _refusals()
    refusals({"ccproxy_event": "invalid_request", "ip_address": "192.0.2.1"})  # a malformed head: 400
    refusals({"ccproxy_event": "request_too_large", "ip_address": "192.0.2.2"})  # 413 or 431
    refusals({"ccproxy_event": "request_timeout", "status": 408, "ip_address": "192.0.2.3"})
    assert layer.counted == ["192.0.2.1", "192.0.2.2", "192.0.2.3"]


def test_other_events_and_events_without_an_address_do_not_count() -> None:
    refusals, layer, _ = _refusals()
    refusals({"ccproxy_event": "invalid_request", "rule": "max_tokens", "ip_address": "192.0.2.1"})  # counted by its layer
    refusals({"ccproxy_event": "request_timeout", "status": 504, "ip_address": "192.0.2.1"})  # upstream, not the client
    refusals({"ccproxy_event": "authentication_failure", "ip_address": "192.0.2.1"})
    refusals({"ccproxy_event": "request_too_large", "ip_address": "-"})
    refusals({"ccproxy_event": "request_too_large"})
    refusals({"ccproxy_event": "request_too_large", "ip_address": None})
    assert layer.counted == []


def test_a_trusted_proxy_is_never_counted_and_a_reload_changes_which_are() -> None:
    refusals, layer, holder = _refusals(["10.0.0.0/8", "2001:db8::/32"])
    for ip in ("10.1.2.3", "2001:db8::5", "192.0.2.7"):
        refusals({"ccproxy_event": "request_too_large", "ip_address": ip})
    assert layer.counted == ["192.0.2.7"]
    holder.current = SimpleNamespace(config=parse({"server": {"tls": {"enabled": False},
                                                              "trusted_proxies": ["192.0.2.0/24"]}}, environ={}),
                                     layers=[layer])
    for ip in ("10.1.2.3", "192.0.2.7"):
        refusals({"ccproxy_event": "request_too_large", "ip_address": ip})
    assert layer.counted == ["192.0.2.7", "10.1.2.3"]
