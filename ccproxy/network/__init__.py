"""Policy layer: see its issue. Not built yet: a no-op layer."""

from __future__ import annotations

from typing import Any

from ccproxy.config import Config
from ccproxy.context import Layer


def build_layer(config: Config, deps: Any, previous: Layer | None) -> Layer:
    """`deps` is a ccproxy.runtime.Deps (reactor, blocklist)."""
    return Layer()


def listener_factory(site: Any, tls: Any, holder: Any, reactor: Any) -> Any:
    """The factory the listening port uses: TLS (if on) around the site."""
    from twisted.protocols.tls import TLSMemoryBIOFactory

    return site if tls is None else TLSMemoryBIOFactory(tls, False, site)
