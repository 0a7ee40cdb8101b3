"""The real daemon, real SDKs: API keys, JWTs from a JWKS endpoint, OAuth2 introspection.

Every test ends by scanning the daemon's whole log for every secret it was given or sent.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anthropic
import jwt
import openai
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.support.authkit import UPSTREAM_KEYS, FakeIntrospection
from tests.support.clients import anthropic_client, openai_client
from tests.support.upstream import FakeUpstream

K_PROD = "ccp_e2e-production-key-00000000000000a1"
K_OLD = "ccp_e2e-expired-key-0000000000000000b2"
K_SOON = "ccp_e2e-expiring-key-000000000000000c3"
K_REMOTE = "ccp_e2e-remote-only-key-00000000000d4"
K_NEW = "ccp_e2e-rotated-in-key-000000000000e5"
K_WRONG = "ccp_e2e-wrong-key-00000000000000000f6"
CLIENT_SECRET = "e2e-introspection-client-secret-77"
MESSAGE = {"model": "claude-sonnet-4-6", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}


def day(offset: int) -> str:
    return (datetime.datetime.now(datetime.UTC).date() + datetime.timedelta(days=offset)).isoformat()


def upstreams() -> dict[str, Any]:
    return {name: {"api_key": key} for name, key in UPSTREAM_KEYS.items()}


def assert_no_secrets(log: str, *secrets: str) -> None:
    assert log.strip(), "the daemon wrote no log"
    for secret in (*secrets, *UPSTREAM_KEYS.values()):
        for line in log.splitlines():
            assert secret not in line, f"a secret ending {secret[-4:]} is in the log: {line[:80]}"


def raw_post(d: Any, path: str, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(d.url + path, data=json.dumps(MESSAGE).encode(), method="POST",
                                 headers={"content-type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=10, context=d.ssl_context()) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(autouse=True)
def _no_sdk_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)


def wait_for(path: Path, text: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = path.read_text() if path.exists() else ""
        if text in content:
            return content
        time.sleep(0.05)
    raise AssertionError(f"{text!r} never reached {path}")


def test_api_keys_end_to_end(daemon, upstream: FakeUpstream, tmp_path: Path) -> None:
    audit, access = tmp_path / "audit.log", tmp_path / "access.log"
    d = daemon({
        "upstreams": upstreams(),
        "security": {
            "audit": {"enabled": True, "outputs": [{"type": "file", "path": str(audit)},
                                                   {"type": "file", "path": str(access), "records": "access"}]},
            "auth": {"enabled": True, "type": "api_key", "api_keys": [
                {"key": "${CCP_E2E_KEY}", "name": "production", "tier": "premium"},
                {"id": "remote", "key": K_REMOTE, "allowed_ips": ["10.0.0.0/8", "2001:db8::/32"]},
            ]},
            "api_keys": {"notification_before": "7d", "keys": [
                {"id": "key-old", "key_sha256": hashlib.sha256(K_OLD.encode()).hexdigest(), "expires": day(-1)},
                {"id": "key-soon", "key": K_SOON, "expires": day(3)},
            ]},
        },
    }, env={"CCP_E2E_KEY": K_PROD})

    # x-api-key (api_key=), Bearer (auth_token=) and the OpenAI SDK's Bearer all pass.
    assert anthropic_client(d, K_PROD).messages.create(**MESSAGE).content[0].text == "Hello!"
    bearer = anthropic_client(d, None, auth_token=K_PROD)
    assert bearer.messages.create(**MESSAGE).content[0].text == "Hello!"
    out = openai_client(d, K_PROD).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert out.choices[0].message.content == "Hello!"
    for seen in upstream.requests:
        assert K_PROD not in json.dumps(seen.headers)
    assert upstream.requests[0].header("x-api-key") == UPSTREAM_KEYS["anthropic"]
    assert upstream.requests[1].header("x-api-key") == UPSTREAM_KEYS["anthropic"]
    assert upstream.requests[1].header("authorization") is None
    assert upstream.requests[2].header("authorization") == "Bearer " + UPSTREAM_KEYS["openai"]
    forwarded = len(upstream.requests)

    with pytest.raises(anthropic.AuthenticationError) as wrong:
        anthropic_client(d, K_WRONG).messages.create(**MESSAGE)
    assert "invalid API key" in str(wrong.value)
    with pytest.raises(openai.AuthenticationError):
        openai_client(d, K_WRONG).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(anthropic.AuthenticationError) as expired:
        anthropic_client(d, K_OLD).messages.create(**MESSAGE)
    assert "expired" in str(expired.value) and "key-old" not in str(expired.value)
    with pytest.raises(anthropic.PermissionDeniedError):
        anthropic_client(d, K_REMOTE).messages.create(**MESSAGE)
    status, body = raw_post(d, "/v1/messages", {})
    assert status == 401 and body["error"]["type"] == "authentication_error"
    assert len(upstream.requests) == forwarded  # nothing refused reached the upstream

    soon = anthropic_client(d, K_SOON).messages.with_raw_response.create(**MESSAGE)
    assert soon.headers["x-ccproxy-api-key-expires"] == day(4) + "T00:00:00Z"
    assert "x-ccproxy-api-key-expires" not in anthropic_client(d, K_PROD).messages.with_raw_response.create(
        **MESSAGE).headers
    assert d.get("/health").status == 200 and d.get("/ready").status == 200

    log = d.log()
    assert "api_key_expiring" in log and "key-soon" in log
    assert "authentication_failure" in log and "expired_api_key" in log and "ip_not_allowed" in log
    assert_no_secrets(log, K_PROD, K_OLD, K_SOON, K_REMOTE, K_WRONG)
    assert f"api_key_mask=…{K_WRONG[-4:]}" in log
    records = wait_for(audit, "ip_not_allowed") + wait_for(access, "/health")
    assert '"api_key_id":"key-old"' in records.replace(" ", "")
    assert_no_secrets(records, K_PROD, K_OLD, K_SOON, K_REMOTE, K_WRONG)


def test_rotation_by_reload_without_downtime(daemon, upstream: FakeUpstream) -> None:
    def security(*keys: tuple[str, str]) -> dict[str, Any]:
        return {"auth": {"enabled": True, "api_keys": []},
                "api_keys": {"keys": [{"id": i, "key": k} for i, k in keys]}}

    d = daemon({"upstreams": upstreams(), "security": security(("key-1", K_PROD))})

    def cfg(*keys: tuple[str, str]) -> dict[str, Any]:
        return {**d.config, "security": security(*keys)}

    client = anthropic_client(d, K_PROD)
    client.messages.create(**MESSAGE)
    assert "config reloaded" in d.reload(cfg(("key-1", K_PROD), ("key-2", K_NEW)))
    client.messages.create(**MESSAGE)  # the old key keeps working during the rotation
    anthropic_client(d, K_NEW).messages.create(**MESSAGE)
    d.reload(cfg(("key-2", K_NEW)))
    with pytest.raises(anthropic.AuthenticationError):
        client.messages.create(**MESSAGE)
    anthropic_client(d, K_NEW).messages.create(**MESSAGE)
    log = d.log()
    assert "api_key_rotation" in log and "key-2" in log
    assert_no_secrets(log, K_PROD, K_NEW)


class FakeJwks:
    def __init__(self, keys: list[dict[str, Any]]) -> None:
        body = json.dumps({"keys": keys}).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/jwks.json"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def jwks_keys() -> Iterator[tuple[Any, Any, FakeJwks]]:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    algs = jwt.algorithms.get_default_algorithms()
    keys = [{**json.loads(algs["RS256"].to_jwk(rsa_key.public_key())), "kid": "rsa-1", "alg": "RS256"},
            {**json.loads(algs["ES256"].to_jwk(ec_key.public_key())), "kid": "ec-1", "alg": "ES256"}]
    server = FakeJwks(keys)
    yield rsa_key, ec_key, server
    server.close()


def test_jwt_from_jwks_end_to_end(daemon, upstream: FakeUpstream, jwks_keys: Any) -> None:
    rsa_key, ec_key, jwks = jwks_keys
    d = daemon({"upstreams": upstreams(), "security": {"auth": {"enabled": True, "type": "jwt", "jwt": {
        "jwks_url": jwks.url, "algorithms": ["RS256", "ES256"], "audience": "ccproxy",
        "issuer": "https://idp.test", "tier_claim": "plan", "leeway": "5s"}}}})
    now = int(time.time())
    base = {"sub": "user-1", "aud": "ccproxy", "iss": "https://idp.test", "exp": now + 300, "plan": "premium"}
    good_rs = jwt.encode(base, rsa_key, algorithm="RS256", headers={"kid": "rsa-1"})
    good_es = jwt.encode(base, ec_key, algorithm="ES256", headers={"kid": "ec-1"})
    expired = jwt.encode({**base, "exp": now - 60}, rsa_key, algorithm="RS256", headers={"kid": "rsa-1"})
    wrong_aud = jwt.encode({**base, "aud": "other"}, ec_key, algorithm="ES256", headers={"kid": "ec-1"})
    alg_none = jwt.encode(base, None, algorithm="none")

    assert anthropic_client(d, None, auth_token=good_rs).messages.create(**MESSAGE).content[0].text == "Hello!"
    out = openai_client(d, good_es).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert out.choices[0].message.content == "Hello!"
    for token, words in ((expired, "expired"), (wrong_aud, "audience"), (alg_none, "algorithm")):
        with pytest.raises(anthropic.AuthenticationError) as e:
            anthropic_client(d, None, auth_token=token).messages.create(**MESSAGE)
        assert words in str(e.value)
    for seen in upstream.requests:
        assert good_rs not in json.dumps(seen.headers) and good_es not in json.dumps(seen.headers)
    assert "jwt:user-1" in d.log()
    assert_no_secrets(d.log(), good_rs, good_es, expired, wrong_aud, alg_none)


def test_oauth2_introspection_end_to_end(daemon, upstream: FakeUpstream) -> None:
    tokens = {"tok-active-0000000001": {"active": True, "sub": "user-9", "exp": int(time.time()) + 600}}
    idp = FakeIntrospection(lambda token: (200, tokens.get(token, {"active": False})))
    try:
        d = daemon({"upstreams": upstreams(), "security": {"auth": {"enabled": True, "type": "oauth2", "oauth2": {
            "introspection_url": idp.url, "client_id": "ccproxy", "client_secret": "${CCP_E2E_CLIENT_SECRET}",
            "timeout": "1s", "cache_ttl": "1m"}}}}, env={"CCP_E2E_CLIENT_SECRET": CLIENT_SECRET})
        client = openai_client(d, "tok-active-0000000001")
        for _ in range(2):
            out = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
            assert out.choices[0].message.content == "Hello!"
        assert len(idp.calls) == 1  # the second request was answered from the cache
        with pytest.raises(openai.AuthenticationError):
            openai_client(d, "tok-inactive-000000002").chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "x"}])

        idp.delay = 10.0
        started = time.monotonic()
        with pytest.raises(anthropic.InternalServerError) as slow:
            anthropic_client(d, "tok-slow-0000000000003").messages.create(**MESSAGE)
        # Not before the 1 s timeout, and well before the endpoint would have answered.
        assert 1.0 <= time.monotonic() - started < 10.0
        assert slow.value.status_code == 503 and "did not answer within 1s" in str(slow.value)
    finally:
        idp.close()
    with pytest.raises(anthropic.InternalServerError) as down:
        anthropic_client(d, "tok-down-0000000000004").messages.create(**MESSAGE)
    assert down.value.status_code == 503 and "unreachable" in str(down.value)
    assert_no_secrets(d.log(), CLIENT_SECRET, "tok-active-0000000001", "tok-inactive-000000002",
                      "tok-slow-0000000000003", "tok-down-0000000000004")


def test_allowed_ips_over_ipv6(daemon, upstream: FakeUpstream) -> None:
    d = daemon({"server": {"host": "::1"}, "upstreams": upstreams(), "security": {"auth": {"enabled": True, "api_keys": [
        {"id": "v6", "key": K_PROD, "allowed_ips": ["::1/128"]},
        {"id": "v4-only", "key": K_REMOTE, "allowed_ips": ["127.0.0.0/8"]},
    ]}}})
    assert anthropic_client(d, K_PROD).messages.create(**MESSAGE).content[0].text == "Hello!"
    with pytest.raises(anthropic.PermissionDeniedError):
        anthropic_client(d, K_REMOTE).messages.create(**MESSAGE)
    assert "ip_address=::1" in d.log()
    assert_no_secrets(d.log(), K_PROD, K_REMOTE)
