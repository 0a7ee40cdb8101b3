"""Rate limits through the real daemon: the SDKs' view, two instances sharing Redis, outages, reload."""

from __future__ import annotations

import http.client
import json
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from tests.support.clients import anthropic_client, openai_client
from tests.support.net import refused, tcp
from tests.support.redis import RedisServer
from tests.support.upstream import FakeUpstream
from tests.support.waiting import wait_until

BODY = json.dumps({"model": "claude-sonnet-4-6", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


def post(daemon: Any, path: str = "/v1/messages", timeout: float = 20.0) -> tuple[int, dict[str, str]]:
    context = ssl.create_default_context(cafile=daemon.ca_file)
    conn = http.client.HTTPSConnection(daemon.host, daemon.port, context=context, timeout=timeout)
    try:
        conn.request("POST", path, BODY, {"content-type": "application/json", "x-api-key": "client-key"})
        response = conn.getresponse()
        response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}
    finally:
        conn.close()


def limits(rate_limiting: dict[str, Any], state: dict[str, Any] | None = None) -> dict[str, Any]:
    config: dict[str, Any] = {"security": {"rate_limiting": rate_limiting}}
    if state is not None:
        config["state"] = state
    return config


def test_sdks_see_a_rate_limit_error_they_understand(daemon: Any, upstream: FakeUpstream) -> None:
    d = daemon(limits({"per_ip": {"requests_per_minute": 30, "burst": 1}}))
    client = anthropic_client(d, max_retries=0)
    raw = client.messages.with_raw_response.create(
        model="claude-sonnet-4-6", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert raw.headers["anthropic-ratelimit-requests-limit"] == "30"
    assert raw.headers["anthropic-ratelimit-requests-remaining"] == "0"
    with pytest.raises(anthropic.RateLimitError) as caught:
        client.messages.create(model="claude-sonnet-4-6", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    headers = caught.value.response.headers
    assert headers["retry-after"] == "2"
    assert headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert caught.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    with pytest.raises(openai.RateLimitError) as refused:
        openai_client(d, max_retries=0).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert refused.value.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.value.code == "rate_limit_exceeded"
    assert len(upstream.requests) == 1


@pytest.mark.timeout(300)  # 200 TLS requests at once on two loaded cores: slow, never wrong
def test_two_instances_sharing_redis_admit_exactly_the_limit(
    daemon: Any, upstream: FakeUpstream, redis_server: RedisServer
) -> None:
    # A generous timeout (two loaded cores), and fail_closed: a slow answer can never admit extra.
    config = limits({"global": {"requests_per_hour": 100, "burst": 100}},
                    {"backend": "redis", "redis": {"url": redis_server.url, "timeout": "5s",
                                                   "on_error": "fail_closed"}})
    first, second = daemon(config), daemon(json.loads(json.dumps(config)))
    statuses: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    go = threading.Event()

    def one(target: Any) -> None:
        go.wait()
        try:
            status, _ = post(target, timeout=240)
        except Exception as e:  # counted, not lost in a thread
            with lock:
                errors.append(e)
            return
        with lock:
            statuses.append(status)

    threads = [threading.Thread(target=one, args=(first if i % 2 else second,)) for i in range(200)]
    for t in threads:
        t.start()
    go.set()
    for t in threads:
        t.join()
    assert errors == []
    outage = [line for d in (first, second) for line in d.log().splitlines() if "backend_unavailable" in line]
    assert sorted(set(statuses)) == [200, 429], (sorted(set(statuses)), outage)
    assert statuses.count(200) == 100
    assert statuses.count(429) == 100
    assert len(upstream.requests) == 100


def test_redis_killed_requests_follow_on_error_within_the_timeout(
    daemon: Any, upstream: FakeUpstream, redis_server: RedisServer
) -> None:
    state = {"backend": "redis", "redis": {"url": redis_server.url, "timeout": "500ms", "on_error": "fail_closed"}}
    d = daemon(limits({"global": {"requests_per_minute": 1000}}, state))
    assert post(d)[0] == 200
    redis_server.kill()
    for _ in range(5):
        started = time.monotonic()
        status, headers = post(d)
        assert status == 503 and headers["retry-after"] == "1"
        assert time.monotonic() - started < 5.0  # a request, TLS and all: not held beyond the 500 ms by much
    assert "rate_limit_backend_unavailable" in d.log()
    redis_server.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status, headers = post(d)
        if status == 200:
            break
        time.sleep(0.3)
    assert status == 200 and headers["anthropic-ratelimit-requests-limit"] == "1000"


def test_reload_keeps_unchanged_counters(daemon: Any, upstream: FakeUpstream) -> None:
    d = daemon(limits({"global": {"requests_per_hour": 3, "burst": 3}}))
    config = d.config  # as written, with the TLS and upstream settings the fixture added
    assert [post(d)[0] for _ in range(4)] == [200, 200, 200, 429]
    config["security"]["rate_limiting"]["per_ip"] = {"requests_per_minute": 100}
    assert "config reloaded" in d.reload(config)
    assert post(d)[0] == 429  # the global limit did not change: still spent
    config["security"]["rate_limiting"]["global"] = {"requests_per_hour": 4, "burst": 4}
    assert "config reloaded" in d.reload(config)
    assert post(d)[0] == 200  # a changed limit starts afresh


def test_auto_block_by_one_instance_is_refused_at_accept_by_both(
    daemon: Any, upstream: FakeUpstream, redis_server: RedisServer
) -> None:
    config = {"security": {"ip_blacklist": {"enabled": False, "auto_block": {"enabled": True, "threshold": 3,
                                                                              "duration": "1h"}}},
              "state": {"backend": "redis", "redis": {"url": redis_server.url, "timeout": "2s"}}}
    first, second = daemon(config), daemon(json.loads(json.dumps(config)))
    assert [post(first)[0] for _ in range(3)] == [200, 200, 200]
    status, headers = post(first)
    assert status == 429 and int(headers["retry-after"]) > 3500
    assert "ip_auto_blocked" in first.log()
    # New connections are closed at accept, before any TLS byte, on both instances (the second learns
    # of the block from Redis within a second). A daemon that accepted would wait for a ClientHello:
    # `refused` tells the two apart; a timeout or a TLS error does not count as a refusal.
    wait_until(lambda: refused(tcp(first)), what="the blocking instance to refuse at accept")
    # A connection the second accepted just before it learnt of the block is closed when it does (a
    # block closes the address's open connections): wait for a refusal the gate itself logged.
    wait_until(lambda: refused(tcp(second)) and "ip_auto_blocked" in second.log(),
               what="the other instance to refuse at accept, logging its own refusal")
    assert len(upstream.requests) == 3


def test_per_key_tiers_and_own_limits_with_authentication(daemon: Any, upstream: FakeUpstream) -> None:
    d = daemon({
        "upstreams": {"anthropic": {"api_key": "sk-ant-upstream-key-000000000000f3a9"}},
        "security": {
            "auth": {"enabled": True, "type": "api_key", "api_keys": [
                {"key": "client-premium-key-0001", "id": "k-premium", "tier": "premium"},
                {"key": "client-own-limit-key-02", "id": "k-own", "rate_limit": 10},
            ]},
            "rate_limiting": {"per_key": {"default": {"requests_per_minute": 100, "daily_quota": 1000},
                                          "premium": {"requests_per_minute": 1000, "daily_quota": 2}}},
        },
    })
    premium = anthropic_client(d, "client-premium-key-0001", max_retries=0)
    own = anthropic_client(d, "client-own-limit-key-02", max_retries=0)

    def ask(client: anthropic.Anthropic) -> Any:
        return client.messages.with_raw_response.create(
            model="claude-sonnet-4-6", max_tokens=5, messages=[{"role": "user", "content": "hi"}])

    assert ask(premium).headers["anthropic-ratelimit-requests-remaining"] == "1"
    assert ask(premium).headers["anthropic-ratelimit-requests-limit"] == "2"
    with pytest.raises(anthropic.RateLimitError) as caught:
        ask(premium)
    assert int(caught.value.response.headers["retry-after"]) >= 1
    # The other key has its own allowance: its rate_limit of 10/minute (burst 1).
    assert ask(own).headers["anthropic-ratelimit-requests-limit"] == "10"
    with pytest.raises(anthropic.RateLimitError) as caught:
        ask(own)
    assert caught.value.response.headers["retry-after"] == "6"
    assert len(upstream.requests) == 3
