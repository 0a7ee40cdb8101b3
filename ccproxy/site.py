"""The factory behind the listener: a HardenedChannel per connection, and the access log.

Requests are read by `ccproxy.network.channel.HardenedChannel` and answered as
`ccproxy.network.request.ProxyRequest`s by the site's resource (`ccproxy.resource.ProxyResource`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger, LogPublisher

from ccproxy.config.network import NetworkConfig
from ccproxy.network.addresses import NetworkSet
from ccproxy.network.channel import HardenedChannel

__all__ = ["ACCESS_PUBLISHER", "ProxySite"]

# Access lines have a publisher of their own: they reach only the outputs that ask for them
# (an audit output with `records: access`), never the daemon log or syslog by default.
ACCESS_PUBLISHER = LogPublisher()
access_log = Logger(namespace="ccproxy.access", observer=ACCESS_PUBLISHER)

class ProxySite(Factory):
    """Builds a HardenedChannel per connection and hands each request to `resource.render`."""

    protocol: Any = HardenedChannel

    def __init__(self, resource: Any, clock: IReactorTime) -> None:
        self.resource = resource
        self.clock = clock
        # The network settings new connections take; the listener points this at the live config.
        self.network: Callable[[], NetworkConfig] = NetworkConfig
        self._trusted: tuple[NetworkConfig | None, NetworkSet] = (None, NetworkSet(()))
        # Whether any output records access lines; the service points this at the live config.
        self.access_wanted: Callable[[], bool] = lambda: True

    def buildProtocol(self, addr: IAddress | None) -> Any:
        channel = self.protocol()
        channel.site = self
        channel.factory = self
        return channel

    def trusted(self) -> NetworkSet:
        config = self.network()
        if self._trusted[0] is not config:
            self._trusted = (config, NetworkSet(config.trusted_proxies))
        return self._trusted[1]

    def log(self, request: Any) -> None:
        if not ACCESS_PUBLISHER._observers or not self.access_wanted():
            return  # no output asked for access lines: build none
        ctx = getattr(request, "ccproxy_ctx", None)
        started = getattr(request, "ccproxy_started", None)
        latency_ms = (self.clock.seconds() - started) * 1000 if started is not None else 0.0
        access_log.info(
            "{method} {path} {status} {latency_ms:.1f}ms key={key_id} request_id={request_id}",
            method=request.method.decode("latin-1"),
            path=request.path.decode("latin-1")[:200],
            status=request.code,
            latency_ms=latency_ms,
            key_id=ctx.identity.key_id if ctx is not None and ctx.identity is not None else "-",
            request_id=getattr(request, "ccproxy_request_id", "-"),
            client_ip=ctx.client_ip if ctx is not None else request.getClientAddress().host,
            # Token usage of a model reply (what was seen of it, when it was cut short).
            **(ctx.usage.fields() if ctx is not None and ctx.usage is not None else {}),
        )
