"""The real daemon, driven by the official SDKs, against the fake upstream."""

from __future__ import annotations

from tests.support.clients import anthropic_client, openai_client
from tests.support.upstream import FakeUpstream


def test_anthropic_sdk_non_streaming(daemon, upstream: FakeUpstream, certs) -> None:
    d = daemon({"upstreams": {"anthropic": {"api_key": "sk-ant-upstream-key-000000000000f3a9"}}})
    client = anthropic_client(d, "client-key-123")
    msg = client.messages.create(model="claude-sonnet-4-6", max_tokens=10,
                                 messages=[{"role": "user", "content": "hi"}])
    assert msg.content[0].text == "Hello!"
    seen = upstream.requests[-1]
    assert seen.path == "/v1/messages"
    assert seen.header("x-api-key") == "sk-ant-upstream-key-000000000000f3a9"
    assert "client-key-123" not in str(seen.headers)
    assert seen.header("anthropic-version")  # passed through as the SDK sent it


def test_openai_sdk_non_streaming(daemon, upstream: FakeUpstream, certs) -> None:
    d = daemon({"upstreams": {"openai": {"api_key": "sk-proj-upstream-0000000000001234"}}})
    client = openai_client(d, "client-key-456")
    out = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert out.choices[0].message.content == "Hello!"
    seen = upstream.requests[-1]
    assert seen.path == "/v1/chat/completions"
    assert seen.header("authorization") == "Bearer sk-proj-upstream-0000000000001234"
    assert "client-key-456" not in str(seen.headers)
