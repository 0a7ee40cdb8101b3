"""JWT bearer tokens (PyJWT): a PEM key, a shared secret, or a JWKS URL kept in a bounded cache."""

from __future__ import annotations

import hashlib
import math
from typing import Any

import jwt
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from ccproxy.auth._base import AuthFailure
from ccproxy.auth._http import SideCallFailed, fetch_json
from ccproxy.config.auth import JwtConfig, load_public_key
from ccproxy.context import Identity, RequestContext

log = Logger()
_MAX_TIER = 64
# Signature checks are the costly part (RS256/ES256: hundreds of microseconds); a token seen again
# within this many seconds is not verified again. Bounds how long a key dropped from a JWKS still
# admits tokens it signed.
VERIFIED_TTL = 60.0
VERIFIED_SIZE = 10000


def _invalid(message: str = "invalid token", reason: str = "invalid_token") -> AuthFailure:
    return AuthFailure(401, message, reason)


class JwksCache:
    """The signing keys of a JWKS URL.

    Refreshed every `jwks_refresh`, and on a token with an unknown `kid` at most once per
    `jwks_min_refresh_interval`. A failed fetch keeps the keys already held until they are
    `jwks_max_stale` old, so a flapping endpoint does not stop the proxy.
    """

    def __init__(self, config: JwtConfig, http: Any, clock: IReactorTime) -> None:
        assert config.jwks_url is not None
        self.config = config
        self.url = config.jwks_url
        self.http = http
        self.clock = clock
        # kid -> (key, the algorithm the key set declares for it, if any)
        self.keys: dict[str | None, tuple[jwt.PyJWK, str | None]] = {}
        self.fetched_at: float | None = None
        self.last_attempt = -math.inf
        self._inflight: defer.Deferred[None] | None = None
        self._call: IDelayedCall | None = None

    def adopt(self, old: JwksCache) -> None:
        """Keep the keys of the previous runtime's cache of the same URL."""
        self.keys, self.fetched_at, self.last_attempt = old.keys, old.fetched_at, old.last_attempt

    def start(self) -> None:
        self._call = self.clock.callLater(0, self._periodic)

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _periodic(self) -> None:
        d = self.refresh()
        d.addErrback(lambda f: log.failure("JWKS refresh failed", f))
        self._call = self.clock.callLater(self.config.jwks_refresh, self._periodic)

    def refresh(self) -> defer.Deferred[None]:
        """One fetch at a time: concurrent callers share it."""
        if self._inflight is None:
            self.last_attempt = self.clock.seconds()
            d = defer.ensureDeferred(self._fetch())
            if d.called:  # answered at once (an in-memory client)
                return d
            self._inflight = d

            def done(result: Any) -> Any:
                self._inflight = None
                return result

            d.addBoth(done)
        waiter: defer.Deferred[None] = defer.Deferred()

        def release(result: Any) -> Any:
            if not waiter.called:  # the waiter may have been cancelled with its request
                waiter.callback(None)
            return result

        self._inflight.addBoth(release)
        return waiter

    async def _fetch(self) -> None:
        try:
            _, data = await fetch_json(
                "JWKS endpoint", self.clock, self.config.jwks_timeout,
                lambda: self.http.get(self.url, headers={"Accept": "application/json"}, allow_redirects=False),
            )
            self.keys = _usable_keys(data)
            self.fetched_at = self.clock.seconds()
        except (SideCallFailed, jwt.PyJWTError, ValueError, TypeError, KeyError) as e:
            log.warn("JWKS refresh from {url} failed, keeping {n} cached keys: {error}",
                     url=self.url, n=len(self.keys), error=str(e))

    def _fresh(self) -> bool:
        return self.fetched_at is not None and self.clock.seconds() - self.fetched_at <= self.config.jwks_max_stale

    def _lookup(self, kid: str | None, alg: str) -> jwt.PyJWK | None:
        if not self._fresh():
            return None
        entry = self.keys.get(kid)
        if entry is None and kid is None and len(self.keys) == 1:
            entry = next(iter(self.keys.values()))
        if entry is None or entry[1] not in (alg, None):
            return None
        return entry[0]

    async def key_for(self, kid: str | None, alg: str) -> Any:
        key = self._lookup(kid, alg)
        if key is None and self.clock.seconds() - self.last_attempt >= self.config.jwks_min_refresh_interval:
            await self.refresh()
            key = self._lookup(kid, alg)
        elif key is None and self._inflight is not None:
            await self.refresh()
            key = self._lookup(kid, alg)
        if key is not None:
            return key.key
        if not self._fresh():
            raise AuthFailure(503, "cannot verify tokens right now: the signing keys are unavailable",
                              "jwks_unavailable")
        raise _invalid("token signed with an unknown key", "unknown_key")


def _usable_keys(data: Any) -> dict[str | None, tuple[jwt.PyJWK, str | None]]:
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError("not a JWK set")
    keys: dict[str | None, tuple[jwt.PyJWK, str | None]] = {}
    for item in data["keys"]:
        # Shared-secret keys never come from a URL; keys for encryption are not for signatures.
        if not isinstance(item, dict) or item.get("kty") == "oct" or item.get("use", "sig") != "sig":
            continue
        try:
            alg = item.get("alg")
            keys[item.get("kid")] = (jwt.PyJWK(item), alg if isinstance(alg, str) else None)
        except jwt.PyJWTError:
            continue
    if not keys:
        raise ValueError("the JWK set holds no usable signing key")
    return keys


class JwtAuthenticator:
    def __init__(self, config: JwtConfig, clock: IReactorTime, jwks: JwksCache | None = None) -> None:
        self.config = config
        self.clock = clock
        self.jwks = jwks
        # sha256(token) -> (until, claims, identity): tokens whose signature was verified lately.
        self.verified: dict[bytes, tuple[float, dict[str, Any], Identity]] = {}
        self.static: Any = None
        if config.secret is not None:
            self.static = config.secret.reveal().encode()
        elif config.public_key_file is not None:
            self.static = load_public_key(config.public_key_file, "security.auth.jwt.public_key_file")

    async def authenticate(self, credential: str, ctx: RequestContext) -> Identity:
        try:
            header = jwt.get_unverified_header(credential)
        except jwt.PyJWTError:
            raise _invalid("credential is not a valid token") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.config.algorithms:
            raise _invalid("token algorithm not allowed", "algorithm_not_allowed")
        digest = hashlib.sha256(credential.encode("utf-8", "surrogateescape")).digest()
        hit = self.verified.get(digest)
        if hit is not None and self.clock.seconds() < hit[0]:
            # The signature was checked a moment ago; the times are checked again every time.
            self._check_times(hit[1])
            return hit[2]
        kid = header.get("kid")
        if self.jwks is not None:
            key = await self.jwks.key_for(kid if isinstance(kid, str) else None, alg)
        else:
            key = self.static
        claims = self._decode(credential, key, alg)
        self._check_times(claims)
        identity = self._identity(claims)
        self._remember(digest, claims, identity)
        return identity

    def _remember(self, digest: bytes, claims: dict[str, Any], identity: Identity) -> None:
        self.verified.pop(digest, None)
        self.verified[digest] = (self.clock.seconds() + VERIFIED_TTL, claims, identity)
        while len(self.verified) > VERIFIED_SIZE:
            del self.verified[next(iter(self.verified))]

    def _decode(self, token: str, key: Any, alg: str) -> dict[str, Any]:
        c = self.config
        options: Any = {
            # Times are checked against the injected clock in _check_times.
            "verify_exp": False, "verify_nbf": False, "verify_iat": False,
            "verify_aud": bool(c.audience), "require": list(c.require),
        }
        try:
            claims: dict[str, Any] = jwt.decode(
                token, key, algorithms=[alg], audience=list(c.audience) or None, issuer=c.issuer, options=options,
            )
        except jwt.InvalidAudienceError:
            raise _invalid("token audience not accepted", "invalid_audience") from None
        except jwt.InvalidIssuerError:
            raise _invalid("token issuer not accepted", "invalid_issuer") from None
        except jwt.MissingRequiredClaimError as e:
            raise _invalid(f"token lacks the {e.claim} claim", "missing_claim") from None
        except (jwt.PyJWTError, ValueError, TypeError):
            raise _invalid() from None
        return claims

    def _check_times(self, claims: dict[str, Any]) -> None:
        now, leeway = self.clock.seconds(), self.config.leeway
        for name in ("exp", "nbf", "iat"):
            if name in claims and (isinstance(claims[name], bool) or not isinstance(claims[name], int | float)):
                raise _invalid(f"token {name} claim is not a number")
        if "exp" in claims and now >= claims["exp"] + leeway:
            raise _invalid("token has expired", "expired_token")
        if "nbf" in claims and now < claims["nbf"] - leeway:
            raise _invalid("token is not valid yet", "token_not_yet_valid")
        if "iat" in claims and now < claims["iat"] - leeway:
            raise _invalid("token was issued in the future", "token_not_yet_valid")

    def _identity(self, claims: dict[str, Any]) -> Identity:
        user = claims.get(self.config.user_claim)
        if not isinstance(user, str | int) or isinstance(user, bool) or str(user) == "":
            raise _invalid(f"token lacks the {self.config.user_claim} claim", "missing_claim")
        tier = "default"
        if self.config.tier_claim is not None:
            value = claims.get(self.config.tier_claim)
            if isinstance(value, str) and 0 < len(value) <= _MAX_TIER:
                tier = value
        return Identity(key_id=f"jwt:{str(user)[:128]}", name=None, tier=tier, user_id=str(user)[:128])

    def stop(self) -> None:
        if self.jwks is not None:
            self.jwks.stop()
