"""The factory behind the listener: a HardenedChannel per connection, and the access log.

Requests are read by `ccproxy.http.server.HardenedChannel` and answered as
`ccproxy.http.request.ProxyRequest`s by the site's resource (`ccproxy.resource.ProxyResource`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger, LogPublisher

from ccproxy.config.network import NetworkConfig
from ccproxy.http.budget import Budget
from ccproxy.http.request import ProxyRequest
from ccproxy.http.server import HardenedChannel
from ccproxy.network.addresses import NetworkSet

__all__ = ["ACCESS_PUBLISHER", "ProxySite"]


class _CountedPublisher(LogPublisher):
    """A LogPublisher that says whether anyone listens, so no access line is built for nobody."""

    def __init__(self) -> None:
        super().__init__()
        self.observed: list[Any] = []

    def addObserver(self, observer: Any) -> None:
        super().addObserver(observer)
        if observer not in self.observed:
            self.observed.append(observer)

    def removeObserver(self, observer: Any) -> None:
        super().removeObserver(observer)
        if observer in self.observed:
            self.observed.remove(observer)


# Access lines have a publisher of their own: they reach only the outputs that ask for them
# (an audit output with `records: access`), never the daemon log or syslog by default.
ACCESS_PUBLISHER = _CountedPublisher()
access_log = Logger(namespace="ccproxy.access", observer=ACCESS_PUBLISHER)

class ProxySite(Factory):
    """Builds a HardenedChannel per connection and hands each request to `resource.render`."""

    protocol: Any = HardenedChannel

    def __init__(self, resource: Any, clock: IReactorTime) -> None:
        self.resource = resource
        self.clock = clock
        # The resource's end-of-request hook, if it has one (ccproxy's own resource does).
        self.resource_completed: Callable[[Any], None] | None = getattr(resource, "completed", None)
        # The network settings new connections take; the listener points this at the live config.
        self.network: Callable[[], NetworkConfig] = NetworkConfig
        self._trusted: tuple[NetworkConfig | None, NetworkSet] = (None, NetworkSet(()))
        # Whether any output records access lines; the service points this at the live config.
        self.access_wanted: Callable[[], bool] = lambda: True
        # Shutting down (see ccproxy.drain): channels ask this before keeping a connection open.
        self.draining = False
        # Every open connection's channel, for the drain to find; gone ones drop out by themselves.
        self.channels: weakref.WeakSet[Any] = weakref.WeakSet()
        # Request bodies held at once, all connections together; the service shares its own.
        self.budget = Budget(lambda: self.network().ddos.max_buffered_bytes)

    def buildProtocol(self, addr: IAddress | None) -> Any:
        channel = self.protocol()
        channel.site = self
        channel.factory = self
        self.channels.add(channel)
        return channel

    def trusted(self) -> NetworkSet:
        config = self.network()
        if self._trusted[0] is not config:
            self._trusted = (config, NetworkSet(config.trusted_proxies))
        return self._trusted[1]

    def completed(self, request: ProxyRequest) -> None:
        """The response to `request` is complete: the layers' end-of-request work, the access line."""
        if self.resource_completed is not None:
            self.resource_completed(request)
        self.log(request)

    def log(self, request: ProxyRequest) -> None:
        if not ACCESS_PUBLISHER.observed or not self.access_wanted():
            return  # no output asked for access lines: build none
        ctx = request.ctx
        latency_ms = (self.clock.seconds() - request.started) * 1000
        access_log.info(
            "{method} {path} {status} {latency_ms:.1f}ms key={key_id} request_id={request_id}",
            method=request.method.decode("latin-1"),
            path=request.path.decode("latin-1")[:200],
            status=request.status,
            latency_ms=latency_ms,
            key_id=ctx.identity.key_id if ctx is not None and ctx.identity is not None else "-",
            user_id=ctx.identity.user_id if ctx is not None and ctx.identity is not None else None,
            request_id=request.request_id,
            client_ip=ctx.client_ip if ctx is not None else getattr(request.client_address(), "host", "-"),
            # Token usage of a model reply (what was seen of it, when it was cut short).
            **(ctx.usage.fields() if ctx is not None and ctx.usage is not None else {}),
        )
