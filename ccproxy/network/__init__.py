"""Connection and HTTP hardening (issue 3).

- `listener_factory`: the listening side, outermost first: the accept gate (`gate.Gate`: IP lists,
  auto-blocks, connection caps, optional PROXY protocol), TLS, then the Site with its
  `channel.HardenedChannel` (request deadlines, size limits, strict request heads).
- `build_layer`: the policy layer, which adds the configured security headers to every response.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.web.http_headers import Headers

from ccproxy import events
from ccproxy.config import Config
from ccproxy.config.network import NetworkConfig
from ccproxy.context import Layer, RequestContext
from ccproxy.errors import ApiError
from ccproxy.network.addresses import AccessPolicy, parse_ip
from ccproxy.network.channel import HardenedChannel
from ccproxy.network.gate import Gate

if TYPE_CHECKING:
    from ccproxy.network.request import ProxyRequest as Request

__all__ = ["Gate", "HardenedChannel", "NetworkLayer", "build_layer", "listener_factory"]


class NetworkLayer(Layer):
    """Security headers on every response; the upstream's own same-named header wins unless told.

    Behind a trusted proxy the gate only saw the proxy's address at accept: the client named by
    X-Forwarded-For meets the same IP lists and auto-blocks here, per request (403).
    """

    def __init__(self, config: NetworkConfig, deps: Any = None) -> None:
        settings = config.security_headers
        self.override = settings.override_upstream
        self.headers = [(name.encode(), value.encode(), name.lower() == "strict-transport-security")
                        for name, value in settings.headers]
        self.access = AccessPolicy(config.whitelist, config.blacklist)
        self.deps = deps
        self.trusted_proxies = bool(config.trusted_proxies)

    def idle(self) -> frozenset[str]:
        steps = set()
        if not self.trusted_proxies:
            steps.add("check")  # the client is the peer the gate judged at accept
        if not self.headers:
            steps.add("decorate")
        return frozenset(steps)

    async def check(self, ctx: RequestContext) -> None:
        if not ctx.peer_ip or ctx.peer_ip == ctx.client_ip:
            return  # the gate has already judged this address
        reason = self.access.refusal(parse_ip(ctx.client_ip))
        if reason is None and self.deps is not None:
            if self.deps.blocklist.is_blocked(ctx.client_ip, self.deps.reactor.seconds()):
                reason = "ip_auto_blocked"
        if reason is not None:
            events.emit("connection_refused", "warning", reason=reason, ip_address=ctx.client_ip,
                        request_id=ctx.request_id, via="x-forwarded-for")
            raise ApiError(403, "requests from this client address are not allowed")

    def decorate(self, ctx: RequestContext | None, request: Request, headers: Headers) -> None:
        secure = request.isSecure()
        for name, value, tls_only in self.headers:
            if tls_only and not secure:
                continue
            if self.override or not headers.hasHeader(name):
                headers.setRawHeaders(name, [value])


def build_layer(config: Config, deps: Any, previous: Layer | None) -> Layer:
    """`deps` is a ccproxy.runtime.Deps (reactor, blocklist)."""
    return NetworkLayer(config.network, deps)


def listener_factory(site: Any, tls: Any, holder: Any, reactor: Any) -> Gate:
    """The factory the listening port uses: the gate, then TLS (if on), then the site."""
    site.network = lambda: holder.current.config.network
    inner = site if tls is None else _tls_factory(tls, site)
    return Gate(inner, holder, reactor)


def _tls_factory(tls: Any, site: Any) -> TLSMemoryBIOFactory:
    factory = TLSMemoryBIOFactory(tls, False, site)
    # Twisted's default TLS protocol holds small writes back for a reactor turn to merge them; each
    # response already leaves in one write, so the wait (a timer per response) buys nothing here.
    factory.protocol = TLSMemoryBIOProtocol
    return factory
