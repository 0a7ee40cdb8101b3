"""Policy layer: see its issue. Not built yet: a no-op layer."""

from __future__ import annotations

from typing import Any

from ccproxy.config import Config
from ccproxy.context import Layer


def build_layer(config: Config, deps: Any, previous: Layer | None) -> Layer:
    """`deps` is a ccproxy.runtime.Deps (reactor, blocklist)."""
    return Layer()
