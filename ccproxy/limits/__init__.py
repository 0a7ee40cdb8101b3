"""How much: rate limits, daily quotas and automatic IP blocking (see docs/rate-limits.md)."""

from __future__ import annotations

from typing import Any

from ccproxy.config import Config
from ccproxy.context import Layer
from ccproxy.limits._layer import LimitsLayer, build


def build_layer(config: Config, deps: Any, previous: Layer | None) -> Layer:
    """`deps` is a ccproxy.runtime.Deps (reactor, blocklist); `previous` keeps counters across reloads."""
    return build(config.limits, deps, previous)


__all__ = ["LimitsLayer", "build_layer"]
