"""OAuth2 bearer tokens checked by RFC 7662 introspection, with a bounded cache of active ones."""

from __future__ import annotations

import base64
import hashlib
import math
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from ccproxy.auth._base import AuthFailure
from ccproxy.auth._http import SideCallFailed, fetch_json
from ccproxy.config.auth import OAuth2Config
from ccproxy.context import Identity, RequestContext

_MAX_FIELD = 128


@attrs.define
class _Cached:
    identity: Identity
    until: float


class Introspector:
    def __init__(self, config: OAuth2Config, http: Any, clock: IReactorTime) -> None:
        self.config = config
        self.http = http
        self.clock = clock
        # sha256(token) -> what introspection said; insertion order gives the eviction order.
        self.cache: dict[bytes, _Cached] = {}
        # sha256(token) -> the requests waiting for the introspection call under way for it.
        self.inflight: dict[bytes, list[defer.Deferred[Any]]] = {}
        pair = f"{config.client_id}:{config.client_secret.reveal()}".encode()
        self._authorization = b"Basic " + base64.b64encode(pair)

    def adopt(self, old: Introspector) -> None:
        if (old.config.introspection_url, old.config.client_id) == (
            self.config.introspection_url, self.config.client_id,
        ):
            self.cache = old.cache

    async def authenticate(self, credential: str, ctx: RequestContext) -> Identity:
        digest = hashlib.sha256(credential.encode("utf-8", "surrogateescape")).digest()
        now = self.clock.seconds()
        hit = self.cache.get(digest)
        if hit is not None and now < hit.until:
            return hit.identity
        self.cache.pop(digest, None)
        data = await self._shared(digest, credential)
        if not isinstance(data, dict) or data.get("active") is not True:
            raise AuthFailure(401, "token is not active", "inactive_token")
        now = self.clock.seconds()
        exp = _expiry(data)
        if exp is not None and exp <= now:
            raise AuthFailure(401, "token has expired", "expired_token")
        self._check_audience(data)
        identity = self._identity(data)
        until = now + self.config.cache_ttl
        if exp is not None:
            until = min(until, exp)
        self._remember(digest, _Cached(identity, until))
        return identity

    def _shared(self, digest: bytes, token: str) -> defer.Deferred[Any]:
        """One introspection call per token at a time; concurrent requests with it wait for that one.

        Each caller gets a Deferred of its own, so a client that goes away cancels only its wait.
        """
        waiter: defer.Deferred[Any] = defer.Deferred()
        waiters = self.inflight.get(digest)
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        waiters = self.inflight[digest] = [waiter]

        def distribute(result: Any) -> None:
            del self.inflight[digest]
            for w in waiters:
                if w.called:  # cancelled: its client went away
                    continue
                if isinstance(result, Failure):
                    w.errback(result)
                else:
                    w.callback(result)

        defer.ensureDeferred(self._introspect(token)).addBoth(distribute)
        return waiter

    async def _introspect(self, token: str) -> Any:
        try:
            _, data = await fetch_json(
                "token introspection endpoint", self.clock, self.config.timeout,
                lambda: self.http.post(
                    self.config.introspection_url,
                    data={"token": token, "token_type_hint": "access_token"},
                    headers={"Authorization": self._authorization, "Accept": "application/json"},
                    allow_redirects=False,
                ),
            )
        except SideCallFailed as e:
            raise AuthFailure(503, f"cannot check the token right now: {e}", "introspection_unavailable") from None
        return data

    def _check_audience(self, data: dict[str, Any]) -> None:
        if not self.config.audience:
            return
        aud = data.get("aud")
        given = {aud} if isinstance(aud, str) else set(aud) if isinstance(aud, list) else set()
        if not given & set(self.config.audience):
            raise AuthFailure(401, "token audience not accepted", "invalid_audience")

    def _identity(self, data: dict[str, Any]) -> Identity:
        sub, username, client = (_text(data.get(k)) for k in ("sub", "username", "client_id"))
        user = sub or username
        tier = "default"
        if self.config.tier_claim is not None:
            tier = _text(data.get(self.config.tier_claim)) or "default"
        who = user or client or "unknown"
        return Identity(key_id=f"oauth2:{who}", name=username or client, tier=tier, user_id=user)

    def _remember(self, digest: bytes, entry: _Cached) -> None:
        self.cache[digest] = entry
        while len(self.cache) > self.config.cache_size:
            del self.cache[next(iter(self.cache))]

    def stop(self) -> None:
        return None


def _text(value: Any) -> str | None:
    if isinstance(value, str) and 0 < len(value) <= _MAX_FIELD:
        return value
    return None


def _expiry(data: dict[str, Any]) -> float | None:
    """The answer's `exp` (RFC 7662: seconds since the epoch), None when it has none.

    Any other `exp` is refused rather than ignored: a token whose expiry cannot be read must not
    pass as one that never expires (a string, a boolean, null, NaN or an infinity included).
    """
    if "exp" not in data:
        return None
    exp = data["exp"]
    if isinstance(exp, bool) or not isinstance(exp, int | float) or not math.isfinite(exp):
        raise AuthFailure(401, "token expiry in the introspection answer is not a number", "invalid_expiry")
    return float(exp)
