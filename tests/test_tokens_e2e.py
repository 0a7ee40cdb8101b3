"""Token usage and token budgets through the real daemon: JSON and SSE, both APIs, memory and Redis."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from tests.support.clients import anthropic_client, openai_client
from tests.support.redis import RedisServer
from tests.support.upstream import FakeUpstream, Script, chat_json, message_json, message_stream

SSE = {"content-type": "text/event-stream"}
JSON = {"content-type": "application/json"}
KEY = "client-token-key-000001"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


def config(tmp_path: Path, tokens: dict[str, int], state: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "upstreams": {"anthropic": {"api_key": "sk-ant-upstream-key-000000000000f3a9"},
                      "openai": {"api_key": "sk-proj-upstream-key-00000000000000f3a9"}},
        "security": {
            "auth": {"enabled": True, "type": "api_key", "api_keys": [{"key": KEY, "id": "k-tokens"}]},
            "rate_limiting": {"per_key": {"default": {"requests_per_minute": 1000, **tokens}}},
            "audit": {"enabled": True, "outputs": [{"type": "file", "path": str(tmp_path / "access.log"),
                                                    "records": "access", "flush_interval": "50ms"}]},
        },
    }
    if state is not None:
        out["state"] = state
    return out


def usage_message(input_tokens: int, output_tokens: int) -> bytes:
    body = message_json("hi")
    body["usage"] = {"input_tokens": input_tokens, "output_tokens": output_tokens,
                     "cache_creation_input_tokens": 7, "cache_read_input_tokens": 11}
    return json.dumps(body).encode()


def ask(client: anthropic.Anthropic) -> Any:
    return client.messages.with_raw_response.create(
        model="claude-sonnet-4-6", max_tokens=5, messages=[{"role": "user", "content": "hi"}])


def access_records(path: Path, n: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if path.exists():
            records = [json.loads(line) for line in path.read_text().splitlines() if line]
            records = [r for r in records if r.get("event") == "http_request" and r["path"] != "/ready"]
            if len(records) >= n:
                return records
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} access records in {path}")


def test_token_budget_refuses_once_spent_with_the_apis_headers(daemon: Any, upstream: FakeUpstream,
                                                                tmp_path: Path) -> None:
    d = daemon(config(tmp_path, {"tokens_per_minute": 100}))
    client = anthropic_client(d, KEY, max_retries=0)
    upstream.expect(Script(body=usage_message(80, 50), headers=JSON))
    first = ask(client)
    assert first.headers["anthropic-ratelimit-tokens-limit"] == "100"
    assert first.headers["anthropic-ratelimit-tokens-remaining"] == "100"
    # 130 tokens were spent against a budget of 100 a minute: the next request waits for 31 of them.
    with pytest.raises(anthropic.RateLimitError) as caught:
        ask(client)
    headers = caught.value.response.headers
    # (130 - 100 + 1) tokens at 100 a minute: 18.6 s from the charge (less the time since, rounded up).
    assert headers["retry-after"] in ("18", "19")
    assert headers["anthropic-ratelimit-tokens-remaining"] == "0"
    assert caught.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    with pytest.raises(openai.RateLimitError) as refused:
        openai_client(d, KEY, max_retries=0).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert refused.value.response.headers["x-ratelimit-remaining-tokens"] == "0"
    assert refused.value.response.headers["x-ratelimit-limit-tokens"] == "100"
    assert len(upstream.requests) == 1
    record = access_records(tmp_path / "access.log", 1)[0]
    assert (record["input_tokens"], record["output_tokens"], record["cache_creation_input_tokens"],
            record["cache_read_input_tokens"]) == (80, 50, 7, 11)


def test_streamed_usage_is_counted_and_a_cut_stream_pays_what_it_used(daemon: Any, upstream: FakeUpstream,
                                                                      tmp_path: Path) -> None:
    d = daemon(config(tmp_path, {"daily_token_quota": 900}))
    client = anthropic_client(d, KEY, max_retries=0)
    events = message_stream("msg_t1", [{"type": "text", "text": "hello there"}],
                            usage={"input_tokens": 300, "output_tokens": 1})
    upstream.expect(Script(events=events, headers=SSE))
    with client.messages.stream(model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}]) as s:
        assert s.get_final_message().usage.output_tokens == sum(len(e) for e in events[:-2]) // 40
    # A stream cut after message_start: its 600 input tokens are charged all the same.
    cut = message_stream("msg_t2", [{"type": "text", "text": "x" * 50}], usage={"input_tokens": 600, "output_tokens": 1})
    upstream.expect(Script(events=cut, headers=SSE, cut_after=3))
    with pytest.raises(Exception):  # noqa: B017 - the SDK reports the broken stream its own way
        with client.messages.stream(model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}]) as s:
            s.get_final_message()
    records = access_records(tmp_path / "access.log", 2)
    assert records[0]["input_tokens"] == 300 and records[0]["output_tokens"] > 1
    assert records[1]["input_tokens"] == 600 and records[1]["output_tokens"] == 1
    with pytest.raises(anthropic.RateLimitError) as caught:
        ask(client)
    assert caught.value.response.headers["anthropic-ratelimit-tokens-limit"] == "900"
    assert caught.value.response.headers["anthropic-ratelimit-tokens-remaining"] == "0"


def test_openai_stream_usage_is_counted(daemon: Any, upstream: FakeUpstream, tmp_path: Path) -> None:
    d = daemon(config(tmp_path, {"daily_token_quota": 10000}))  # no refill: exact figures
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o",
             "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]}
    final = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o", "choices": [],
             "usage": {"prompt_tokens": 40, "completion_tokens": 9, "total_tokens": 49,
                       "prompt_tokens_details": {"cached_tokens": 30}}}
    upstream.expect(Script(events=[f"data: {json.dumps(c)}\n\n".encode() for c in (chunk, final)]
                           + [b"data: [DONE]\n\n"], headers=SSE))
    out = openai_client(d, KEY).chat.completions.create(
        model="gpt-4o", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "hi"}])
    assert [c.usage.prompt_tokens for c in out if c.usage] == [40]
    upstream.expect(Script(body=json.dumps(chat_json()).encode(), headers=JSON))
    raw = openai_client(d, KEY).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert raw.headers["x-ratelimit-remaining-tokens"] == str(10000 - 49)
    records = access_records(tmp_path / "access.log", 2)
    assert (records[0]["input_tokens"], records[0]["output_tokens"], records[0]["cache_read_input_tokens"]) == (40, 9, 30)


def test_two_instances_sharing_redis_share_the_token_budget(daemon: Any, upstream: FakeUpstream,
                                                            redis_server: RedisServer, tmp_path: Path) -> None:
    state = {"backend": "redis", "redis": {"url": redis_server.url, "timeout": "5s", "on_error": "fail_closed"}}
    first = daemon(config(tmp_path / "a", {"daily_token_quota": 500}, state))
    second = daemon(config(tmp_path / "b", {"daily_token_quota": 500}, state))
    upstream.expect(Script(body=usage_message(450, 60), headers=JSON))
    ask(anthropic_client(first, KEY, max_retries=0))
    with pytest.raises(anthropic.RateLimitError):
        ask(anthropic_client(second, KEY, max_retries=0))
    assert len(upstream.requests) == 1


def test_a_tier_with_only_a_token_budget_is_enforced(daemon: Any, upstream: FakeUpstream, tmp_path: Path) -> None:
    """No request limit, no automatic blocking: the budget alone still refuses once spent."""
    settings = config(tmp_path, {"daily_token_quota": 100})
    settings["security"]["rate_limiting"]["per_key"]["default"].pop("requests_per_minute")
    d = daemon(settings)
    client = anthropic_client(d, KEY, max_retries=0)
    upstream.expect(Script(body=usage_message(80, 50), headers=JSON))
    assert ask(client).headers["anthropic-ratelimit-tokens-remaining"] == "100"
    with pytest.raises(anthropic.RateLimitError) as caught:
        ask(client)
    assert caught.value.response.headers["anthropic-ratelimit-tokens-remaining"] == "0"
    assert len(upstream.requests) == 1
