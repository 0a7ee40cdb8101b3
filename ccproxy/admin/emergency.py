"""Emergency mode on the request path: the `security.emergency` profile, while it is switched on.

The switch is read on every request (one attribute), so `ccproxy security emergency --enable`
applies to the next request, without a reload. The layer runs right after authentication.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ccproxy import events
from ccproxy.config import Config
from ccproxy.config.admin import EmergencyConfig
from ccproxy.context import Layer, RequestContext
from ccproxy.errors import ApiError
from ccproxy.limits._core import Rate
from ccproxy.limits._headers import whole_seconds
from ccproxy.limits._memory import MemoryStore
from ccproxy.limits._plan import MINUTE, default_burst
from ccproxy.network.addresses import NetworkSet, parse_ip

if TYPE_CHECKING:
    from ccproxy.runtime import Deps

# Addresses followed by the emergency per-address limit (least recently seen forgotten past this).
MAX_ADDRESSES = 100_000


class EmergencyLayer(Layer):
    def __init__(self, config: EmergencyConfig, incident: Any, clock: Any, store: MemoryStore | None = None) -> None:
        self.config = config
        self.incident = incident
        self.clock = clock
        self.allowed_ips = NetworkSet(config.allowed_ips)
        self.allowed_keys = frozenset(config.allowed_keys)
        # Kept across reloads (handed on by build_layer), so a reload does not refill every bucket.
        self.store = store or MemoryStore(MAX_ADDRESSES)

    def idle(self) -> frozenset[str]:
        return frozenset({"decorate", "response_filter"})

    async def check(self, ctx: RequestContext) -> None:
        if not self.incident.emergency:
            return
        config = self.config
        if self.allowed_ips and not self.allowed_ips.contains(parse_ip(ctx.client_ip)):
            self._refuse(ctx, "emergency_ip_not_allowed", 403,
                         "ccproxy is in emergency mode: this address is not served")
        if config.require_auth and ctx.identity is None:
            self._refuse(ctx, "emergency_auth_required", 401,
                         "ccproxy is in emergency mode: a ccproxy credential is required")
        if self.allowed_keys and (ctx.identity is None or ctx.identity.key_id not in self.allowed_keys):
            self._refuse(ctx, "emergency_key_not_allowed", 403,
                         "ccproxy is in emergency mode: this key is not served")
        per_minute = config.requests_per_minute_per_ip
        if per_minute is not None:
            rate = Rate("emergency_per_ip", f"e:{per_minute}:{ctx.client_ip}", per_minute, MINUTE,
                        default_burst(per_minute))
            decision = self.store.decide(self.clock.seconds(), [rate])
            if not decision.allowed:
                retry = whole_seconds(decision.retry_after)
                events.emit("rate_limit_exceeded", "warning", request_id=ctx.request_id, ip_address=ctx.client_ip,
                            api_key_id=ctx.identity.key_id if ctx.identity is not None else None,
                            limit="emergency_per_ip", retry_after=retry)
                raise ApiError(429, f"ccproxy is in emergency mode: at most {per_minute} requests a minute "
                                    f"per address; retry after {retry} s", headers={"retry-after": str(retry)})

    def _refuse(self, ctx: RequestContext, reason: str, status: int, message: str) -> None:
        events.emit("connection_refused", "warning", reason=reason, ip_address=ctx.client_ip,
                    request_id=ctx.request_id, via="emergency",
                    api_key_id=ctx.identity.key_id if ctx.identity is not None else None)
        raise ApiError(status, message)


def build_layer(config: Config, deps: Deps, previous: Layer | None) -> Layer:
    incident = getattr(deps, "incident", None)
    if incident is None:
        return Layer()
    store = previous.store if isinstance(previous, EmergencyLayer) else None
    return EmergencyLayer(config.emergency, incident, deps.reactor, store)
