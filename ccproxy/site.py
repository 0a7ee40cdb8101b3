"""The twisted.web Site: access log lines of our own, no tracebacks to clients."""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

access_log = Logger(namespace="ccproxy.access")

# Idle time allowed on a kept-alive connection between requests.
DEFAULT_IDLE_TIMEOUT = 75.0


class ProxyRequest(Request):
    def process(self) -> None:
        self.ccproxy_started = self.channel.site.clock.seconds()  # type: ignore[attr-defined]
        super().process()


class ProxySite(Site):
    displayTracebacks = False
    requestFactory = ProxyRequest

    def __init__(self, resource: Resource, clock: IReactorTime, timeout: float = DEFAULT_IDLE_TIMEOUT) -> None:
        super().__init__(resource, timeout=timeout)
        self.clock = clock
        self._reactor = clock

    def log(self, request: Any) -> None:
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
