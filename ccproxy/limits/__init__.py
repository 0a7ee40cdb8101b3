"""How much: rate limits, daily quotas and automatic IP blocking (see docs/rate-limits.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.logger import Logger

from ccproxy.config import Config
from ccproxy.context import Layer
from ccproxy.limits._layer import LimitsLayer, build

if TYPE_CHECKING:
    from ccproxy.runtime import Deps


def build_layer(config: Config, deps: Deps, previous: Layer | None) -> Layer:
    """`previous` keeps counters across reloads."""
    limits = config.limits
    if limits.enabled and limits.per_key and not getattr(config.auth, "enabled", False):
        _log.warn("security.rate_limiting.per_key is set but security.auth is off: without a key, "
                  "per-key limits and daily quotas apply to nobody")
    return build(limits, deps, previous, config.network.ddos.ipv6_prefix)


_log = Logger()


__all__ = ["LimitsLayer", "build_layer"]
