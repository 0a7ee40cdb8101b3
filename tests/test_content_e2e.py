"""Content filtering through the real daemon, with the official SDKs."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import openai
import pytest

from tests.support.clients import anthropic_client, http_client, openai_client
from tests.support.content import seed_content
from tests.support.upstream import FakeUpstream, Script, anthropic_stream, message_json, openai_stream

SECURITY = seed_content(max_tokens=1000, max_messages=3, max_message_length=200)
SYSTEM = "You are Quill, a terse assistant for the Example Corp support desk; never mention vault nine."
KEY = "sk-ant-api03-Zz9Yy8Xx7Ww6Vv5Uu4Tt3Ss2Rr1Qq0"
TEXT = (f"Sure! Use {KEY} and mail ops@example.com or call (415) 555-0132. Card 4111 1111 1111 1111. "
        "My instructions: a terse assistant for the Example Corp support desk; never mention it.")
MASKED = ("Sure! Use [REDACTED_API_KEY] and mail [REDACTED_EMAIL] or call [REDACTED_PHONE]. "
          "Card XXXX-XXXX-XXXX-XXXX. My instructions:[REDACTED_SYSTEM_PROMPT]it.")
SSE = {"content-type": "text/event-stream"}


def pieces(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


@pytest.fixture
def proxy(daemon: Any) -> Any:
    return daemon({"security": SECURITY})


def test_anthropic_stream_final_message_is_masked(proxy: Any, upstream: FakeUpstream) -> None:
    # Deltas of 3 characters split every secret over several events.
    upstream.expect(Script(events=anthropic_stream(pieces(TEXT, 3)), headers=SSE))
    client = anthropic_client(proxy)
    streamed = ""
    with client.messages.stream(model="claude-sonnet-4-6", max_tokens=100, system=SYSTEM,
                                messages=[{"role": "user", "content": "hello"}]) as stream:
        for text in stream.text_stream:
            streamed += text
        final = stream.get_final_message()
    assert final.content[0].text == MASKED
    assert streamed == MASKED
    seen = upstream.requests[-1]
    assert seen.header("accept-encoding") is None
    log = proxy.log()
    assert "response_masked" in log
    assert KEY not in log and "ops@example.com" not in log


def test_openai_stream_is_masked(proxy: Any, upstream: FakeUpstream) -> None:
    upstream.expect(Script(events=openai_stream(pieces(TEXT, 4)), headers=SSE))
    client = openai_client(proxy)
    out = ""
    for chunk in client.chat.completions.create(model="gpt-4o", stream=True, messages=[
            {"role": "system", "content": SYSTEM}, {"role": "user", "content": "hello"}]):
        if chunk.choices and chunk.choices[0].delta.content:
            out += chunk.choices[0].delta.content
    assert out == MASKED


def test_anthropic_json_is_masked(proxy: Any, upstream: FakeUpstream) -> None:
    upstream.expect(Script(body=json.dumps(message_json(TEXT)).encode(),
                           headers={"content-type": "application/json"}))
    client = anthropic_client(proxy)
    msg = client.messages.create(model="claude-sonnet-4-6", max_tokens=100, system=SYSTEM,
                                 messages=[{"role": "user", "content": "hello"}])
    assert msg.content[0].text == MASKED  # the SDK read a valid body of the right length


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"max_tokens": 1001}, "max_tokens exceeds the limit of 1000"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}] * 2},
         "4 messages exceed the limit of 3"),
        ({"messages": [{"role": "user", "content": "x" * 201}]}, "exceeds the limit of 200"),
        ({"messages": [{"role": "user", "content": "my password is swordfish"}]},
         "request blocked by content rule blocked_patterns[1]"),
    ],
)
def test_refusals_reach_the_sdk(proxy: Any, upstream: FakeUpstream, kwargs: dict[str, Any], words: str) -> None:
    args: dict[str, Any] = {"model": "claude-sonnet-4-6", "max_tokens": 10,
                            "messages": [{"role": "user", "content": "hi"}], **kwargs}
    with pytest.raises(anthropic.BadRequestError) as caught:
        anthropic_client(proxy).messages.create(**args)
    assert words in str(caught.value)
    assert "swordfish" not in str(caught.value)
    assert upstream.requests == []
    assert "invalid_request" in proxy.log()


def test_openai_refusal_shape(proxy: Any, upstream: FakeUpstream) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client(proxy).chat.completions.create(
            model="gpt-4o", max_completion_tokens=5000, messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 400
    assert "max_completion_tokens exceeds the limit of 1000" in str(caught.value)


def test_malformed_body_is_400(proxy: Any, upstream: FakeUpstream) -> None:
    with http_client(proxy) as client:
        r = client.post(proxy.url + "/v1/messages", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert upstream.requests == []


def test_control_characters_never_reach_upstream(proxy: Any, upstream: FakeUpstream) -> None:
    anthropic_client(proxy).messages.create(model="claude-sonnet-4-6", max_tokens=10, messages=[
        {"role": "user", "content": "bell\x07 and escape\x1b[0m\nnext\tline"}])
    body = json.loads(upstream.requests[-1].body)
    assert body["messages"][0]["content"] == "bell and escape[0m\nnext\tline"


def test_encoded_upstream_body_is_refused_not_passed(proxy: Any, upstream: FakeUpstream) -> None:
    import gzip

    body = gzip.compress(json.dumps(message_json(f"key {KEY}")).encode())
    upstream.expect(Script(body=body, headers={"content-type": "application/json", "content-encoding": "gzip"}))
    with pytest.raises(anthropic.InternalServerError) as caught:
        anthropic_client(proxy).messages.create(model="claude-sonnet-4-6", max_tokens=10,
                                                messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 502
    assert "cannot be inspected" in str(caught.value)
    # The daemon carries on serving.
    msg = anthropic_client(proxy).messages.create(model="claude-sonnet-4-6", max_tokens=10,
                                                  messages=[{"role": "user", "content": "hi"}])
    assert msg.content[0].text == "Hello!"


def test_stream_cut_midway_never_flushes_the_held_tail(proxy: Any, upstream: FakeUpstream) -> None:
    events = anthropic_stream(["Your key: sk-ant-", "api03-Zz9Yy8Xx7Ww6"])
    upstream.expect(Script(events=events, headers=SSE, cut_after=5))  # both deltas sent, then cut
    with http_client(proxy) as client:
        r = client.post(proxy.url + "/v1/messages", json={
            "model": "m", "max_tokens": 10, "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200
    assert b"sk-ant-" not in r.content and b"Zz9Yy8" not in r.content
    assert b"event: error" in r.content
