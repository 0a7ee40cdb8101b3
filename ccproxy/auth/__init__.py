"""Who may call: API keys, JWTs or OAuth2 introspection, chosen by `security.auth.type`.

See docs/auth.md. `build_layer` is the entry point the runtime calls on start-up and on every reload.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.logger import Logger

from ccproxy.auth._keys import ApiKeyAuthenticator, KeyNotices
from ccproxy.auth._layer import AuthLayer
from ccproxy.config import Config
from ccproxy.config.auth import API_KEY, JWT
from ccproxy.context import Layer

if TYPE_CHECKING:
    from ccproxy.runtime import Deps

__all__ = ["AuthLayer", "build_layer"]

log = Logger()


def build_layer(config: Config, deps: Deps, previous: Layer | None, http: Any = None) -> Layer:
    """`http` is a treq-like client (tests)."""
    old = previous if isinstance(previous, AuthLayer) else None
    if old is not None:
        old.retire()
    auth = config.auth
    if old is not None and old.pool is not None and (not auth.enabled or auth.type == API_KEY):
        old.pool.closeCachedConnections()  # no side calls any more
    if not auth.enabled:
        return Layer()
    clock = deps.reactor
    _warn_missing_upstream_keys(config)
    if auth.type == API_KEY:
        notices = KeyNotices(auth, clock)
        notices.start(old.notices if old is not None else None)
        return AuthLayer(ApiKeyAuthenticator(auth, clock), clock, notices)
    # Side calls (treq) and JWTs (PyJWT) are loaded only by a config that uses them.
    from ccproxy.auth._http import http_client
    from ccproxy.auth._jwt import JwksCache, JwtAuthenticator
    from ccproxy.auth._oauth2 import Introspector

    pool = None
    if http is None:
        # One side-call client for the daemon's life: a reload must not leave pools behind.
        if old is not None and old.pool is not None:
            http, pool = old.http, old.pool
        else:
            http, pool = http_client(deps.reactor)
    if auth.type == JWT:
        assert auth.jwt is not None
        jwks = None
        if auth.jwt.jwks_url is not None:
            jwks = JwksCache(auth.jwt, http, clock)
            before = getattr(old.authenticator, "jwks", None) if old is not None else None
            if isinstance(before, JwksCache) and before.url == jwks.url:
                jwks.adopt(before)
            jwks.start()
        return AuthLayer(JwtAuthenticator(auth.jwt, clock, jwks), clock, http=http, pool=pool)
    assert auth.oauth2 is not None
    introspector = Introspector(auth.oauth2, http, clock)
    if old is not None and isinstance(old.authenticator, Introspector):
        introspector.adopt(old.authenticator)
    return AuthLayer(introspector, clock, http=http, pool=pool)


def _warn_missing_upstream_keys(config: Config) -> None:
    for upstream in (config.upstreams.anthropic, config.upstreams.openai):
        if upstream.api_key is None:
            log.warn(
                "security.auth is enabled but upstreams.{name}.api_key is not set: requests for {name} "
                "are refused, since a client's ccproxy credential is never forwarded upstream",
                name=upstream.name,
            )
