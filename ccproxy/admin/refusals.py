"""Requests the HTTP layer refuses (malformed heads 400, slow ones 408, oversized 413/431) never
reach the policy layers; this observer of their events counts them towards auto-blocking."""

from __future__ import annotations

from typing import Any

from ccproxy.network.addresses import NetworkSet, parse_ip


class HttpRefusals:
    # The only events it looks at: registered for these alone, so no other event is built for it.
    EVENTS = frozenset({"invalid_request", "request_too_large", "request_timeout"})

    def __init__(self, holder: Any) -> None:
        self.holder = holder
        self._trusted: tuple[Any, NetworkSet] = (None, NetworkSet(()))

    def __call__(self, event: dict[str, Any]) -> None:
        name = event.get("ccproxy_event")
        refused = (
            (name == "invalid_request" and "rule" not in event)  # with a rule: a content refusal, counted
            or name == "request_too_large"
            or (name == "request_timeout" and event.get("status") == 408)  # not a send or TLS timeout
        )
        if not refused:
            return
        ip = event.get("ip_address")
        if not isinstance(ip, str) or ip == "-":
            return
        runtime = self.holder.current
        if self._is_trusted_proxy(runtime.config.network, ip):
            return  # a load balancer speaks for many clients: never block it for one of them
        for layer in runtime.layers:
            count = getattr(layer, "count_refusal", None)
            if count is not None:
                count(ip)

    def _is_trusted_proxy(self, network: Any, ip: str) -> bool:
        if not network.trusted_proxies:
            return False
        if self._trusted[0] is not network:
            self._trusted = (network, NetworkSet(network.trusted_proxies))
        return self._trusted[1].contains(parse_ip(ip))
