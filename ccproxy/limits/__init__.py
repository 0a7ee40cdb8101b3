"""How much: rate limits, daily quotas and automatic IP blocking (see docs/rate-limits.md)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
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


class SharedValue:
    """One small value shared by the instances using the same Redis (nothing to share with the
    memory backend): `publish` writes it (in the background), `fetch` reads it (None: not shared)."""

    def __init__(self, holder: Any, name: str) -> None:
        self.holder = holder
        self.name = name

    def _store(self) -> Any:
        from ccproxy.limits._redis import RedisStore

        limiter = limiter_of(self.holder.current)
        store = getattr(limiter, "store", None)
        return store if isinstance(store, RedisStore) else None

    def publish(self, value: Any) -> None:
        store = self._store()
        if store is None:
            return
        d = defer.ensureDeferred(store.set_shared(self.name, json.dumps(value)))
        d.addErrback(lambda f: _log.warn("could not share {name} through Redis: {error}", name=self.name,
                                         error=f.getErrorMessage()))

    async def fetch(self) -> Any:
        store = self._store()
        if store is None:
            return None
        text = await store.get_shared(self.name)
        try:
            return None if text is None else json.loads(text)
        except ValueError:
            return None


__all__ = ["LimitsLayer", "SharedValue", "build_layer", "limiter_of", "share_block"]
