"""OAuth2 tokens by RFC 7662 introspection: active, inactive, cached, down, slow."""

from __future__ import annotations

import base64
import json
from typing import Any
from urllib.parse import parse_qs

from treq.testing import StubTreq
from twisted.internet import defer, error, task
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from ccproxy.auth import AuthLayer, build_layer
from ccproxy.errors import ApiError
from tests.support.authkit import config, context

NOW = 1_800_000_000.0
CLIENT_SECRET = "introspection-client-secret-01"


class Deps:
    def __init__(self, clock: task.Clock) -> None:
        self.reactor = clock
        self.blocklist = None


class Introspection(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.tokens: dict[str, dict[str, Any]] = {}
        self.calls: list[dict[str, Any]] = []
        self.mode = "ok"

    def render_POST(self, request: Any) -> Any:
        form = {k.decode(): v[0].decode() for k, v in parse_qs(request.content.read()).items()}
        self.calls.append({"form": form, "authorization": request.getHeader(b"authorization")})
        if self.mode == "hang":
            return NOT_DONE_YET
        if self.mode == "fail":
            request.setResponseCode(502)
            return b"bad gateway"
        return json.dumps(self.tokens.get(form["token"], {"active": False})).encode()


def layer_for(http: Any, **extra: Any) -> tuple[AuthLayer, task.Clock]:
    clock = task.Clock()
    clock.advance(NOW)
    cfg = config({"enabled": True, "type": "oauth2", "oauth2": {
        "introspection_url": "https://idp.test/introspect", "client_id": "ccproxy", "client_secret": CLIENT_SECRET,
        "timeout": "3s", "cache_ttl": "5m", "tier_claim": "tier", **extra}})
    layer = build_layer(cfg, Deps(clock), None, http=http)
    assert isinstance(layer, AuthLayer)
    return layer, clock


def check(layer: AuthLayer, token: str, http: Any = None) -> Any:
    ctx = context({"authorization": f"Bearer {token}"})
    out: list[Any] = []
    defer.ensureDeferred(layer.check(ctx)).addBoth(out.append)
    if http is not None:
        http.flush()
    assert out, "check did not finish"
    if out[0] is None:
        return ctx.identity
    assert isinstance(out[0].value, ApiError), out[0]
    return out[0].value


def test_active_token_is_cached_until_the_earlier_of_exp_and_ttl() -> None:
    idp = Introspection()
    idp.tokens["tok-a"] = {"active": True, "sub": "user-7", "username": "ana", "exp": NOW + 120, "tier": "premium"}
    idp.tokens["tok-b"] = {"active": True, "sub": "user-8", "exp": NOW + 3600}
    http = StubTreq(idp)
    layer, clock = layer_for(http)
    identity = check(layer, "tok-a", http)
    assert (identity.key_id, identity.user_id, identity.name, identity.tier) == (
        "oauth2:user-7", "user-7", "ana", "premium")
    call = idp.calls[0]
    assert call["form"] == {"token": "tok-a", "token_type_hint": "access_token"}
    assert call["authorization"] == b"Basic " + base64.b64encode(f"ccproxy:{CLIENT_SECRET}".encode())
    assert check(layer, "tok-a", http).user_id == "user-7" and len(idp.calls) == 1  # cached
    check(layer, "tok-b", http)
    clock.advance(121)  # tok-a's exp has passed; tok-b's cache entry lives for the TTL
    idp.tokens["tok-a"]["active"] = False
    assert check(layer, "tok-a", http).status == 401
    assert check(layer, "tok-b", http).user_id == "user-8" and len(idp.calls) == 3
    clock.advance(180)  # 301 s: past the 5 minute TTL
    assert check(layer, "tok-b", http).user_id == "user-8" and len(idp.calls) == 4


def test_inactive_token_is_401() -> None:
    idp = Introspection()
    http = StubTreq(idp)
    layer, _ = layer_for(http)
    err = check(layer, "tok-unknown", http)
    assert err.status == 401 and "not active" in err.message


def test_audience_is_checked_when_configured() -> None:
    idp = Introspection()
    idp.tokens["t"] = {"active": True, "sub": "u", "aud": ["other"]}
    http = StubTreq(idp)
    layer, _ = layer_for(http, audience="ccproxy")
    assert check(layer, "t", http).status == 401
    idp.tokens["t"]["aud"] = ["other", "ccproxy"]
    assert check(layer, "t", http).user_id == "u"


def test_failing_endpoint_is_503() -> None:
    idp = Introspection()
    idp.mode = "fail"
    http = StubTreq(idp)
    layer, _ = layer_for(http)
    err = check(layer, "tok", http)
    assert err.status == 503 and "answered HTTP 502" in err.message
    assert CLIENT_SECRET not in err.message


class Refusing:
    def post(self, *args: Any, **kw: Any) -> defer.Deferred[Any]:
        return defer.fail(error.ConnectionRefusedError())


def test_unreachable_endpoint_is_503() -> None:
    layer, _ = layer_for(Refusing())
    err = check(layer, "tok")
    assert err.status == 503 and "unreachable" in err.message


def test_slow_endpoint_is_503_after_the_timeout() -> None:
    idp = Introspection()
    idp.mode = "hang"
    layer, clock = layer_for(StubTreq(idp))
    out: list[Any] = []
    defer.ensureDeferred(layer.check(context({"x-api-key": "tok"}))).addBoth(out.append)
    clock.advance(2.9)
    assert out == []
    clock.advance(0.1)
    (failure,) = out
    assert failure.value.status == 503 and "did not answer within 3s" in failure.value.message


class Held(Resource):
    """Holds every introspection request until the test answers it."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[Any] = []

    def render_POST(self, request: Any) -> Any:
        self.pending.append(request)
        return NOT_DONE_YET


def test_concurrent_requests_share_one_introspection_call() -> None:
    idp = Held()
    http = StubTreq(idp)
    layer, _ = layer_for(http)
    out: list[Any] = []
    gone = defer.ensureDeferred(layer.check(context({"x-api-key": "tok-shared"})))
    gone.addErrback(lambda f: f.trap(defer.CancelledError))
    for _ in range(3):
        ctx = context({"x-api-key": "tok-shared"})
        defer.ensureDeferred(layer.check(ctx)).addBoth(lambda r, ctx=ctx: out.append((r, ctx.identity)))
    http.flush()
    assert len(idp.pending) == 1 and out == []
    gone.cancel()  # one client goes away: the others still get their answer
    (request,) = idp.pending
    request.write(json.dumps({"active": True, "sub": "user-5"}).encode())
    request.finish()
    http.flush()
    assert [(r, i.user_id) for r, i in out] == [(None, "user-5")] * 3
    assert len(idp.pending) == 1 and layer.authenticator.inflight == {}  # type: ignore[attr-defined]


def test_an_expiry_that_is_not_a_number_is_refused() -> None:
    idp = Introspection()
    bad = ["1800000100", True, None, [NOW + 60], {"at": NOW + 60}, float("nan"), float("inf")]
    for i, exp in enumerate(bad):
        idp.tokens[f"tok-{i}"] = {"active": True, "sub": "user-7", "exp": exp}
    idp.tokens["tok-none"] = {"active": True, "sub": "user-8"}  # no exp at all: optional in RFC 7662
    idp.tokens["tok-int"] = {"active": True, "sub": "user-9", "exp": int(NOW) + 60}
    http = StubTreq(idp)
    layer, _ = layer_for(http)
    for i, exp in enumerate(bad):
        err = check(layer, f"tok-{i}", http)
        assert isinstance(err, ApiError) and err.status == 401 and "expiry" in err.message, exp
    assert check(layer, "tok-none", http).user_id == "user-8"
    assert check(layer, "tok-int", http).user_id == "user-9"
