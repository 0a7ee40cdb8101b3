"""How much: rate limits, daily quotas and automatic IP blocking (see docs/rate-limits.md)."""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from ccproxy.config import Config
from ccproxy.context import Layer
from ccproxy.limits._layer import LimitsLayer, build


def build_layer(config: Config, deps: Any, previous: Layer | None) -> Layer:
    """`deps` is a ccproxy.runtime.Deps (reactor, blocklist); `previous` keeps counters across reloads."""
    limits = config.limits
    if limits.enabled and limits.per_key and not getattr(config.auth, "enabled", False):
        _log.warn("security.rate_limiting.per_key is set but security.auth is off: without a key, "
                  "per-key limits and daily quotas apply to nobody")
    return build(limits, deps, previous)


_log = Logger()


def limiter_of(runtime: Any) -> Any:
    """The runtime's Limiter (counters, blocks, the store), or None when limits are off."""
    for layer in runtime.layers:
        limiter = getattr(layer, "limiter", None)
        if limiter is not None:
            return limiter
    return None


def share_block(holder: Any, target: str, until: float | None) -> None:
    """Publish an operator's or a rule's block (or, `until` None, its lifting) to the instances
    sharing Redis, if any."""
    limiter = limiter_of(holder.current)
    if limiter is not None:
        limiter.share(target, until)


__all__ = ["LimitsLayer", "build_layer", "limiter_of", "share_block"]
