"""JWT bearer tokens, signed here: HS256, RS256 (PEM file), ES256 (JWKS), and every refusal."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from treq.testing import StubTreq
from twisted.internet import task
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from ccproxy.auth import AuthLayer, build_layer
from ccproxy.errors import ApiError
from tests.support.authkit import config, context, run

NOW = 1_800_000_000.0
SECRET = "an-hmac-secret-that-is-long-enough-000"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


class Deps:
    def __init__(self, clock: task.Clock) -> None:
        self.reactor = clock
        self.blocklist = None


def claims(**extra: Any) -> dict[str, Any]:
    return {"sub": "user-42", "exp": NOW + 600, "iat": NOW - 10, "aud": "ccproxy", "iss": "https://idp.test",
            "tier": "premium", **extra}


def hs256_by_hand(payload: dict[str, Any], key: bytes) -> str:
    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    signing = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + b"." + b64(json.dumps(payload).encode())
    return (signing + b"." + b64(hmac.new(key, signing, hashlib.sha256).digest())).decode()


def public_pem(key: Any) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def layer_for(jwt_cfg: dict[str, Any], tmp: Path | None = None, http: Any = None) -> tuple[AuthLayer, task.Clock]:
    clock = task.Clock()
    clock.advance(NOW)
    base = {"algorithms": ["HS256"], "secret": SECRET, "audience": "ccproxy", "issuer": "https://idp.test",
            "tier_claim": "tier", "leeway": "30s"}
    cfg = config({"enabled": True, "type": "jwt", "jwt": {**base, **jwt_cfg}}, base_dir=str(tmp or "."))
    layer = build_layer(cfg, Deps(clock), None, http=http)
    assert isinstance(layer, AuthLayer)
    return layer, clock


def refused(layer: AuthLayer, token: str, status: int = 401) -> str:
    err = run(layer, context({"authorization": f"Bearer {token}"}))
    assert isinstance(err, ApiError), err
    assert err.status == status
    return err.message


def test_hs256_token_gives_identity() -> None:
    layer, _ = layer_for({})
    ctx = context({"authorization": "Bearer " + jwt.encode(claims(), SECRET, algorithm="HS256")})
    assert run(layer, ctx) is None
    assert ctx.identity is not None
    assert (ctx.identity.key_id, ctx.identity.user_id, ctx.identity.tier) == ("jwt:user-42", "user-42", "premium")
    assert not ctx.headers.hasHeader(b"authorization")
    assert ctx.request.request_headers.hasHeader(b"authorization")  # the client's request is left as sent


def test_rs256_with_pem_file_and_x_api_key_header(tmp_path: Path) -> None:
    (tmp_path / "pub.pem").write_bytes(public_pem(RSA_KEY))
    layer, _ = layer_for({"algorithms": ["RS256"], "secret": None, "public_key_file": "pub.pem"}, tmp_path)
    ctx = context({"x-api-key": jwt.encode(claims(tier=None), RSA_KEY, algorithm="RS256")})
    assert run(layer, ctx) is None
    assert ctx.identity is not None and ctx.identity.tier == "default"
    # The classic confusion: an HS256 token "signed" with the public key must not pass.
    forged = hs256_by_hand(claims(), public_pem(RSA_KEY))
    assert "algorithm not allowed" in refused(layer, forged)


@pytest.mark.parametrize(("token_claims", "words"), [
    (claims(exp=NOW - 31), "expired"),
    (claims(aud="someone-else"), "audience"),
    (claims(iss="https://evil.test"), "issuer"),
    (claims(nbf=NOW + 60), "not valid yet"),
    (claims(exp=None), "exp"),
    ({k: v for k, v in claims().items() if k != "exp"}, "exp"),
    ({k: v for k, v in claims().items() if k != "sub"}, "sub"),
])
def test_hs256_refusals(token_claims: dict[str, Any], words: str) -> None:
    layer, _ = layer_for({})
    assert words in refused(layer, jwt.encode(token_claims, SECRET, algorithm="HS256"))


def test_leeway_applies_to_exp_and_nbf() -> None:
    layer, _ = layer_for({})
    assert run(layer, context({"x-api-key": jwt.encode(claims(exp=NOW - 29, nbf=NOW + 29), SECRET)})) is None


@pytest.mark.parametrize("token", [
    jwt.encode(claims(), None, algorithm="none"),
    jwt.encode(claims(), "x" * 40, algorithm="HS256"),
    jwt.encode(claims(), SECRET * 2, algorithm="HS512"),
    "not-a-token",
    "a.b.c",
])
def test_bad_tokens(token: str) -> None:
    layer, _ = layer_for({})
    refused(layer, token)


class Jwks(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.keys: list[dict[str, Any]] = []
        self.mode = "ok"
        self.hits = 0

    def render_GET(self, request: Any) -> Any:
        self.hits += 1
        if self.mode == "hang":
            return NOT_DONE_YET
        if self.mode == "fail":
            request.setResponseCode(500)
            return b"{}"
        return json.dumps({"keys": self.keys}).encode()


def jwk(key: Any, kid: str, alg: str) -> dict[str, Any]:
    data = json.loads(jwt.algorithms.get_default_algorithms()[alg].to_jwk(key.public_key()))
    return {**data, "kid": kid, "alg": alg, "use": "sig"}


def jwks_layer(**extra: Any) -> tuple[AuthLayer, task.Clock, Jwks, StubTreq]:
    endpoint = Jwks()
    endpoint.keys = [jwk(EC_KEY, "ec-1", "ES256")]
    http = StubTreq(endpoint)
    layer, clock = layer_for({"algorithms": ["ES256", "RS256"], "secret": None,
                              "jwks_url": "https://idp.test/jwks", "jwks_min_refresh_interval": "30s",
                              "jwks_max_stale": "1h", "jwks_timeout": "2s", "jwks_refresh": "10m", **extra}, http=http)
    clock.advance(0)
    http.flush()
    return layer, clock, endpoint, http


def es256(kid: str, key: Any = EC_KEY, **extra: Any) -> str:
    return jwt.encode(claims(**extra), key, algorithm="ES256", headers={"kid": kid})


def test_es256_from_jwks() -> None:
    layer, _, endpoint, _ = jwks_layer()
    ctx = context({"authorization": "Bearer " + es256("ec-1")})
    assert run(layer, ctx) is None
    assert ctx.identity is not None and ctx.identity.user_id == "user-42"
    assert endpoint.hits == 1
    layer.stop()


def test_unknown_kid_refreshes_at_a_bounded_rate() -> None:
    layer, clock, endpoint, http = jwks_layer()
    other = ec.generate_private_key(ec.SECP256R1())
    assert "unknown key" in refused(layer, es256("ec-2", other))  # just fetched: no refetch yet
    assert endpoint.hits == 1
    clock.advance(30)
    assert "unknown key" in refused(layer, es256("ec-2", other))  # refetched once: still unknown
    assert endpoint.hits == 2
    for _ in range(5):
        refused(layer, es256("ec-2", other))
    assert endpoint.hits == 2  # within jwks_min_refresh_interval: no more fetches
    endpoint.keys.append(jwk(other, "ec-2", "ES256"))
    clock.advance(30)
    d = layer.check(context({"x-api-key": es256("ec-2", other)}))
    import twisted.internet.defer as defer

    result = defer.ensureDeferred(d)
    http.flush()
    out: list[Any] = []
    result.addBoth(out.append)
    assert out == [None] and endpoint.hits == 3
    assert run(layer, context({"x-api-key": es256("ec-1")})) is None
    layer.stop()


def test_failing_jwks_keeps_cached_keys_until_stale() -> None:
    layer, clock, endpoint, http = jwks_layer()
    endpoint.mode = "fail"
    clock.advance(600)  # a periodic refresh, which fails
    http.flush()
    assert endpoint.hits == 2
    assert run(layer, context({"x-api-key": es256("ec-1", exp=NOW + 7200)})) is None
    clock.advance(3001)  # more than jwks_max_stale since the last good fetch
    http.flush()
    assert "unavailable" in refused(layer, es256("ec-1", exp=NOW + 7200), status=503)
    layer.stop()
    assert clock.getDelayedCalls() == []


def test_hanging_jwks_gives_503_after_the_timeout() -> None:
    endpoint = Jwks()
    endpoint.mode = "hang"
    layer, clock = layer_for({"algorithms": ["ES256"], "secret": None, "jwks_url": "https://idp.test/jwks",
                              "jwks_timeout": "2s"}, http=StubTreq(endpoint))
    clock.advance(0)
    out: list[Any] = []
    import twisted.internet.defer as defer

    defer.ensureDeferred(layer.check(context({"x-api-key": es256("ec-1")}))).addBoth(out.append)
    assert out == []
    clock.advance(2)
    (err,) = out
    assert isinstance(err.value, ApiError) and err.value.status == 503
    layer.stop()


def test_verified_tokens_are_remembered_but_times_rechecked() -> None:
    layer, clock = layer_for({"leeway": "0s"})
    token = jwt.encode(claims(exp=NOW + 30), SECRET, algorithm="HS256")
    assert run(layer, context({"x-api-key": token})) is None
    authenticator: Any = layer.authenticator
    assert len(authenticator.verified) == 1
    layer_static = authenticator.static
    authenticator.static = b"not-the-key-any-more-000000000000000"  # a re-verification would now fail
    clock.advance(10)
    assert run(layer, context({"x-api-key": token})) is None
    clock.advance(20)
    assert "expired" in refused(layer, token)
    authenticator.static = layer_static


def test_reload_keeps_the_jwks_cache_and_stops_the_old_timer() -> None:
    layer, clock, endpoint, http = jwks_layer()
    cfg = config({"enabled": True, "type": "jwt", "jwt": {
        "algorithms": ["ES256"], "jwks_url": "https://idp.test/jwks", "audience": "ccproxy"}})
    newer = build_layer(cfg, Deps(clock), layer, http=http)
    assert isinstance(newer, AuthLayer)
    endpoint.mode = "fail"  # the new layer must not need a fetch to accept a known key
    assert run(newer, context({"x-api-key": es256("ec-1")})) is None
    clock.advance(0)
    http.flush()
    assert len(clock.getDelayedCalls()) == 1  # only the new layer's refresh timer
    newer.stop()
    assert clock.getDelayedCalls() == []
