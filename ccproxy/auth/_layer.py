"""The auth layer: every request but /health and /ready must carry a credential we accept."""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime

from ccproxy import events
from ccproxy.auth._base import Authenticator, AuthFailure, credential, strip_credentials
from ccproxy.auth._keys import KeyNotices
from ccproxy.context import Layer, RequestContext
from ccproxy.errors import ApiError


class AuthLayer(Layer):
    def __init__(self, authenticator: Authenticator, clock: IReactorTime,
                 notices: KeyNotices | None = None, http: Any = None, pool: Any = None) -> None:
        self.authenticator = authenticator
        self.clock = clock
        self.notices = notices
        # The treq client of side calls (JWKS, introspection), handed on across reloads.
        self.http = http
        self.pool = pool

    async def check(self, ctx: RequestContext) -> None:
        headers = ctx.headers
        presented = credential(headers)
        # The client's credential is for ccproxy: it never goes upstream, accepted or not.
        strip_credentials(headers)
        try:
            if presented is None:
                raise AuthFailure(401, "missing credentials: send x-api-key or Authorization: Bearer",
                                  "missing_credentials")
            identity = await self.authenticator.authenticate(presented, ctx)
        except AuthFailure as failure:
            _event(ctx, "authentication_failure", "warning", failure.key_id, failure.user_id, failure.reason,
                   failure.mask)
            raise ApiError(failure.status, failure.message, headers=failure.headers) from None
        ctx.identity = identity
        _event(ctx, "authentication_success", "info", identity.key_id, identity.user_id, None)
        upstream = ctx.route.upstream
        if upstream.api_key is None:
            raise ApiError(500, f"ccproxy has no credential for the {upstream.name} upstream "
                                f"(set upstreams.{upstream.name}.api_key)")

    def retire(self) -> None:
        """Stop timers when a reload replaces this layer; caches are handed on, not stopped."""
        if self.notices is not None:
            self.notices.stop()
        self.authenticator.stop()

    def stop(self) -> Any:
        """At shutdown: timers, and the side-call client's idle connections."""
        self.retire()
        if self.pool is not None:
            return self.pool.closeCachedConnections()
        return None


def _event(ctx: RequestContext, name: str, severity: str, key_id: str | None, user_id: str | None,
           reason: str | None, key_mask: str | None = None) -> None:
    fields: dict[str, Any] = {
        "request_id": ctx.request_id,
        "ip_address": ctx.client_ip,
        "api_key_id": key_id,
        "user_id": user_id,
        "method": ctx.method.decode("latin-1"),
        "path": ctx.path.decode("latin-1")[:200],
    }
    if reason is not None:
        fields["reason"] = reason
    if key_mask is not None:
        fields["api_key_mask"] = key_mask
    events.emit(name, severity, **fields)
