"""The listening side, outermost first: the accept gate, TLS (if on), then the site."""

from __future__ import annotations

from typing import Any

from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol

from ccproxy.network.gate import Gate

__all__ = ["listener_factory"]


def listener_factory(site: Any, tls: Any, holder: Any, reactor: Any, gate: type[Gate] = Gate) -> Gate:
    """The factory the listening port uses: the gate, then TLS (if on), then the site."""
    site.network = lambda: holder.current.config.network
    inner = site if tls is None else _tls_factory(tls, site)
    return gate(inner, holder, reactor)


def _tls_factory(tls: Any, site: Any) -> TLSMemoryBIOFactory:
    factory = TLSMemoryBIOFactory(tls, False, site)
    # Twisted's default TLS protocol holds small writes back for a reactor turn to merge them; each
    # response already leaves in one write, so the wait (a timer per response) buys nothing here.
    factory.protocol = TLSMemoryBIOProtocol
    return factory
