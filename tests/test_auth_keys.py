"""API keys in memory: lookup, expiry, addresses, identities, notices, and the layer's refusals."""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet import task
from twisted.logger import globalLogPublisher

from ccproxy.auth import AuthLayer, build_layer
from ccproxy.auth._keys import EXPIRES_HEADER, find_key, index_keys, ip_allowed
from ccproxy.config._reader import parse_network
from ccproxy.config.auth import ApiKey
from ccproxy.errors import ApiError
from ccproxy.secrets import Secret
from tests.support.authkit import Events, config, context, run

KEY_A = "ccp_test-key-alpha-000000000000000000001"
KEY_B = "ccp_test-key-bravo-000000000000000000002"
KEY_OLD = "ccp_test-key-old-00000000000000000000003"
DAY = 86400.0


def ts(date: str) -> float:
    return datetime.datetime.fromisoformat(date).replace(tzinfo=datetime.UTC).timestamp()


class Deps:
    def __init__(self, clock: task.Clock) -> None:
        self.reactor = clock
        self.blocklist = None


@pytest.fixture
def events() -> Iterator[Events]:
    seen = Events()
    globalLogPublisher.addObserver(seen)
    yield seen
    globalLogPublisher.removeObserver(seen)


def keys_config(**extra: Any) -> Any:
    return config(
        {"enabled": True, "type": "api_key", "api_keys": [
            {"key": KEY_A, "name": "production", "tier": "premium", "rate_limit": 100, "user_id": "u-1",
             "allowed_ips": ["127.0.0.0/8", "::1/128"]},
        ]},
        {"rotation_period": "30d", "notification_before": "7d", "keys": [
            {"id": "key-1", "key": KEY_OLD, "expires": "2026-01-31", "created": "2025-11-01"},
            {"id": "key-2", "key_sha256": hashlib.sha256(KEY_B.encode()).hexdigest(), "expires": "2026-03-31",
             "created": "2026-01-20"},
        ]},
        **extra,
    )


def layer_at(when: str, cfg: Any = None, previous: Any = None) -> tuple[AuthLayer, task.Clock]:
    clock = task.Clock()
    clock.advance(ts(when))
    layer = build_layer(cfg or keys_config(), Deps(clock), previous)
    assert isinstance(layer, AuthLayer)
    return layer, clock


def test_find_key_compares_digests() -> None:
    keys = (ApiKey("a", Secret(hashlib.sha256(b"one-key-000000000").hexdigest())),
            ApiKey("b", Secret(hashlib.sha256(b"two-key-000000000").hexdigest())))
    index = index_keys(keys)
    assert find_key(index, "two-key-000000000") is keys[1]
    assert find_key(index, "two-key-00000000") is None
    assert find_key(index, "") is None


@pytest.mark.parametrize(("ip", "allowed"), [
    ("10.1.2.3", True), ("11.0.0.1", False), ("::ffff:10.0.0.9", True), ("2001:db8::5", True),
    ("2001:db9::5", False), ("not-an-ip", False), ("fe80::1%eth0", False),
])
def test_ip_allowed(ip: str, allowed: bool) -> None:
    nets = (parse_network("10.0.0.0/8", "x"), parse_network("2001:db8::/32", "x"))
    assert ip_allowed(ip, nets) is allowed


def test_valid_key_sets_identity_and_strips_credentials(events: Events) -> None:
    layer, _ = layer_at("2026-01-25")
    ctx = context({"x-api-key": KEY_A})
    assert run(layer, ctx) is None
    assert ctx.identity is not None
    assert (ctx.identity.key_id, ctx.identity.name, ctx.identity.tier, ctx.identity.user_id,
            ctx.identity.rate_limit) == ("production", "production", "premium", "u-1", 100)
    assert not ctx.headers.hasHeader(b"x-api-key")
    assert ctx.request.request_headers.getRawHeaders(b"x-api-key") == [KEY_A.encode()]  # the client's request is left as sent
    (ok,) = events.named("authentication_success")
    assert ok["api_key_id"] == "production" and ok["ip_address"] == "127.0.0.1"
    assert ok["request_id"] == "req_test" and ok["path"] == "/v1/messages"
    assert KEY_A not in repr(events.seen)


def test_bearer_header_and_rotation_keys_both_valid() -> None:
    layer, _ = layer_at("2026-01-25")
    for key, key_id in ((KEY_OLD, "key-1"), (KEY_B, "key-2")):
        ctx = context({"authorization": f"Bearer {key}"}, client_ip="192.0.2.7")
        assert run(layer, ctx) is None
        assert ctx.identity is not None and ctx.identity.key_id == key_id
        assert ctx.identity.tier == "default"
        assert not ctx.headers.hasHeader(b"authorization")


@pytest.mark.parametrize(("headers", "reason", "message"), [
    ({}, "missing_credentials", "missing credentials"),
    ({"authorization": "Basic dXNlcjpwYXNz"}, "missing_credentials", "missing credentials"),
    ({"x-api-key": "ccp_wrong-key-000000000000000000000"}, "invalid_api_key", "invalid API key"),
])
def test_refusals(events: Events, headers: dict[str, str], reason: str, message: str) -> None:
    layer, _ = layer_at("2026-01-25")
    ctx = context(headers)
    err = run(layer, ctx)
    assert isinstance(err, ApiError) and err.status == 401 and err.error_type == "authentication_error"
    assert message in err.message
    assert ctx.identity is None
    (fail,) = events.named("authentication_failure")
    assert fail["reason"] == reason and fail["api_key_id"] is None
    assert "wrong-key" not in repr(events.seen)
    if reason == "invalid_api_key":
        assert fail["api_key_mask"] == "…0000"


def test_expired_key_refused_without_naming_it(events: Events) -> None:
    layer, clock = layer_at("2026-01-31T23:59:59")
    assert run(layer, context({"x-api-key": KEY_OLD})) is None  # valid through its expiry date
    clock.advance(1)
    err = run(layer, context({"x-api-key": KEY_OLD}))
    assert isinstance(err, ApiError) and err.status == 401
    assert "expired" in err.message and "key-1" not in err.message
    fail = events.named("authentication_failure")[-1]
    assert fail["reason"] == "expired_api_key" and fail["api_key_id"] == "key-1"


def test_key_from_wrong_address_is_403(events: Events) -> None:
    layer, _ = layer_at("2026-01-25")
    err = run(layer, context({"x-api-key": KEY_A}, client_ip="10.9.9.9"))
    assert isinstance(err, ApiError) and err.status == 403 and err.error_type == "permission_error"
    assert run(layer, context({"x-api-key": KEY_A}, client_ip="::1")) is None
    fail = events.named("authentication_failure")[-1]
    assert fail["reason"] == "ip_not_allowed" and fail["ip_address"] == "10.9.9.9"


def test_expiry_header_only_within_notification_window() -> None:
    layer, clock = layer_at("2026-01-20")
    ctx = context({"x-api-key": KEY_OLD})
    run(layer, ctx)
    assert EXPIRES_HEADER not in ctx.extra_headers  # 12 days left, window is 7
    clock.advance(6 * DAY)
    ctx = context({"x-api-key": KEY_OLD})
    run(layer, ctx)
    assert ctx.extra_headers[EXPIRES_HEADER] == "2026-02-01T00:00:00Z"


def test_missing_upstream_key_is_a_clear_500() -> None:
    cfg = keys_config(upstream_keys=False)
    layer, _ = layer_at("2026-01-25", cfg)
    err = run(layer, context({"x-api-key": KEY_A}, cfg=cfg))
    assert isinstance(err, ApiError) and err.status == 500
    assert "upstreams.anthropic.api_key" in err.message


def test_expiring_notices_at_start_and_once_a_day(events: Events) -> None:
    layer, clock = layer_at("2026-01-26")
    assert events.named("api_key_expiring") == []  # not before the reactor runs
    clock.advance(0)
    (first,) = events.named("api_key_expiring")
    assert first["api_key_id"] == "key-1" and first["expires"] == "2026-02-01T00:00:00Z"
    clock.advance(DAY - 3600)
    assert len(events.named("api_key_expiring")) == 1
    clock.advance(3600)
    assert len(events.named("api_key_expiring")) == 2
    clock.pump([3600] * 24 * 10)  # then daily until it expires, and no more
    assert [e["days_left"] for e in events.named("api_key_expiring")] == [6, 5, 4, 3, 2, 1]
    layer.stop()
    assert clock.getDelayedCalls() == []


def test_rotation_due_from_created_date(events: Events) -> None:
    layer, clock = layer_at("2025-11-30")
    clock.advance(0)
    assert events.named("api_key_rotation_due") == []
    clock.advance(DAY)  # key-1 created 2025-11-01 is 30 days old on 2025-12-01
    (due,) = events.named("api_key_rotation_due")
    assert due["api_key_id"] == "key-1" and due["age_days"] == 30.0
    layer.stop()


def test_reload_keeps_notice_schedule_and_reports_rotation(events: Events) -> None:
    layer, clock = layer_at("2026-01-26")
    clock.advance(0)
    assert len(events.named("api_key_expiring")) == 1
    rotated = config(
        {"enabled": True, "api_keys": [{"key": KEY_A, "name": "production"}]},
        {"notification_before": "7d", "keys": [
            {"id": "key-1", "key": KEY_OLD, "expires": "2026-01-31"},
            {"id": "key-3", "key": "ccp_brand-new-key-000000000000000000004"},
        ]},
    )
    newer = build_layer(rotated, Deps(clock), layer)
    clock.advance(0)
    assert len(events.named("api_key_expiring")) == 1  # already reported today
    (rotation,) = events.named("api_key_rotation")
    assert rotation["added"] == ["key-3"] and rotation["removed"] == ["key-2"]
    assert len(clock.getDelayedCalls()) == 1  # the old layer's timer is gone
    newer.stop()
