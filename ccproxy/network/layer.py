"""The network policy layer: security headers on every response, and the IP lists and auto-blocks
applied again per request to the client a trusted proxy names."""


from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.web.http_headers import Headers

from ccproxy import events
from ccproxy._compat import canonical_name, set_checked_headers
from ccproxy.config import Config
from ccproxy.config.network import NetworkConfig
from ccproxy.context import Layer, RequestContext
from ccproxy.errors import ApiError
from ccproxy.network.addresses import AccessPolicy, client_key, parse_ip

if TYPE_CHECKING:
    from ccproxy.http.request import ProxyRequest as Request
    from ccproxy.runtime import Deps

__all__ = ["NetworkLayer", "build_layer"]


class NetworkLayer(Layer):
    """Security headers on every response; the upstream's own same-named header wins unless told.

    Behind a trusted proxy the gate only saw the proxy's address at accept: the client named by
    X-Forwarded-For meets the same IP lists and auto-blocks here, per request (403).
    """

    def __init__(self, config: NetworkConfig, deps: Deps | None = None) -> None:
        settings = config.security_headers
        self.override = settings.override_upstream
        self.headers = {False: settings.lines(secure=False), True: settings.lines(secure=True)}
        # Keyed as Headers keys them, once (the values were checked when the config was read).
        self._fields = {secure: tuple((canonical_name(name), value) for name, value in lines)
                        for secure, lines in self.headers.items()}
        self.access = AccessPolicy(config.whitelist, config.blacklist)
        self.deps = deps
        self.trusted_proxies = bool(config.trusted_proxies)
        self.ipv6_prefix = config.ddos.ipv6_prefix

    def idle(self) -> frozenset[str]:
        steps = set()
        if not self.trusted_proxies:
            steps.add("check")  # the client is the peer the gate judged at accept
        if not self.headers[True]:
            steps.add("decorate")
        return frozenset(steps)

    async def check(self, ctx: RequestContext) -> None:
        if not ctx.peer_ip or ctx.peer_ip == ctx.client_ip:
            return  # the gate has already judged this address
        reason = self.access.refusal(parse_ip(ctx.client_ip))
        if reason is None and self.deps is not None:
            if self.deps.blocklist.is_blocked(client_key(ctx.client_ip, self.ipv6_prefix), self.deps.reactor.seconds()):
                reason = "ip_auto_blocked"
        if reason is not None:
            events.emit("connection_refused", "warning", reason=reason, ip_address=ctx.client_ip,
                        request_id=ctx.request_id, via="x-forwarded-for")
            raise ApiError(403, "requests from this client address are not allowed")

    def decorate(self, ctx: RequestContext | None, request: Request, headers: Headers) -> None:
        set_checked_headers(headers, self._fields[request.is_secure()], self.override)


def build_layer(config: Config, deps: Deps, previous: Layer | None) -> Layer:
    return NetworkLayer(config.network, deps)
