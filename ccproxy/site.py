"""The twisted.web Site: access log lines of our own, no tracebacks to clients.

The channel (connection deadlines and limits) is `ccproxy.network.channel.HardenedChannel`, installed
by `ccproxy.network.listener_factory`; the request here counts its body against the size limit and
names the client, behind trusted proxies, by X-Forwarded-For.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.logger import Logger, LogPublisher
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from ccproxy.config.network import NetworkConfig
from ccproxy.network.addresses import NetworkSet, canonical, client_from_forwarded

# Access lines have a publisher of their own: they reach only the outputs that ask for them
# (an audit output with `records: access`), never the daemon log or syslog by default.
ACCESS_PUBLISHER = LogPublisher()
access_log = Logger(namespace="ccproxy.access", observer=ACCESS_PUBLISHER)

# Idle time allowed on a kept-alive connection between requests.
DEFAULT_IDLE_TIMEOUT = 75.0


class ProxyRequest(Request):
    _body_size = 0
    _client: IAddress | None = None

    def process(self) -> None:
        self.ccproxy_started = self.channel.site.clock.seconds()  # type: ignore[attr-defined]
        super().process()

    def handleContentChunk(self, data: bytes) -> None:
        # Counted before it is stored: a body over the limit is cut, never buffered.
        self._body_size += len(data)
        check = getattr(self.channel, "body_received", None)
        if check is not None and not check(self._body_size):
            return
        super().handleContentChunk(data)

    def getClientAddress(self) -> IAddress:
        """The socket peer, or behind a trusted proxy the right-most untrusted X-Forwarded-For hop."""
        if self._client is None:
            peer = super().getClientAddress()
            site = getattr(self.channel, "site", None)
            host = getattr(peer, "host", None)
            if host is not None:
                client = canonical(host)
                if isinstance(site, ProxySite) and site.trusted():
                    forwarded = self.requestHeaders.getRawHeaders(b"x-forwarded-for") or []
                    client = client_from_forwarded(host, forwarded, site.trusted())
                if client != host:
                    kind = IPv6Address if ":" in client else IPv4Address
                    peer = kind("TCP", client, getattr(peer, "port", 0))
            self._client = peer
        return self._client


class ProxySite(Site):
    displayTracebacks = False
    requestFactory = ProxyRequest

    def __init__(self, resource: Resource, clock: IReactorTime, timeout: float = DEFAULT_IDLE_TIMEOUT) -> None:
        # Bodies are forwarded, never read as HTML form fields: skip twisted.web's form parsing, which
        # parses the Content-Type of every POST with the email package (a large share of a request's time).
        super().__init__(resource, timeout=timeout, reactor=clock, parsePOSTFormSubmission=False)
        self.clock = clock
        self._reactor = clock
        # The network settings new connections take; the listener points this at the live config.
        self.network: Callable[[], NetworkConfig] = NetworkConfig
        self._trusted: tuple[NetworkConfig | None, NetworkSet] = (None, NetworkSet(()))

    def trusted(self) -> NetworkSet:
        config = self.network()
        if self._trusted[0] is not config:
            self._trusted = (config, NetworkSet(config.trusted_proxies))
        return self._trusted[1]

    def log(self, request: Any) -> None:
        if not ACCESS_PUBLISHER._observers:
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
        )
