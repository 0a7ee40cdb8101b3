"""Connection and HTTP hardening (issue 3).

- `listener_factory`: the listening side, outermost first: the accept gate (`gate.Gate`: IP lists,
  auto-blocks, connection caps, optional PROXY protocol), TLS, then the Site with its
  `channel.HardenedChannel` (request deadlines, size limits, strict request heads).
- `build_layer`: the policy layer, which adds the configured security headers to every response.
"""

from __future__ import annotations

from typing import Any

from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.http_headers import Headers
from twisted.web.server import Request

from ccproxy.config import Config
from ccproxy.config.network import NetworkConfig
from ccproxy.context import Layer, RequestContext
from ccproxy.network.channel import HardenedChannel
from ccproxy.network.gate import Gate

__all__ = ["Gate", "HardenedChannel", "NetworkLayer", "build_layer", "listener_factory"]


class NetworkLayer(Layer):
    """Security headers on every response; the upstream's own same-named header wins unless told."""

    def __init__(self, config: NetworkConfig) -> None:
        settings = config.security_headers
        self.override = settings.override_upstream
        self.headers = [(name.encode(), value.encode(), name.lower() == "strict-transport-security")
                        for name, value in settings.headers]

    def decorate(self, ctx: RequestContext | None, request: Request, headers: Headers) -> None:
        secure = request.isSecure()
        for name, value, tls_only in self.headers:
            if tls_only and not secure:
                continue
            if self.override or not headers.hasHeader(name):
                headers.setRawHeaders(name, [value])


def build_layer(config: Config, deps: Any, previous: Layer | None) -> Layer:
    """`deps` is a ccproxy.runtime.Deps (reactor, blocklist)."""
    return NetworkLayer(config.network)


def listener_factory(site: Any, tls: Any, holder: Any, reactor: Any) -> Gate:
    """The factory the listening port uses: the gate, then TLS (if on), then the site."""
    site.protocol = HardenedChannel
    # The channel keeps its own deadlines; twisted's idle timer (reset by every byte) is not used.
    site.timeOut = None
    site.network = lambda: holder.current.config.network
    inner = site if tls is None else TLSMemoryBIOFactory(tls, False, site)
    return Gate(inner, holder, reactor)
