"""Content filtering through the real daemon, with the official SDKs."""

from __future__ import annotations

import json
import time
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


def test_ambiguous_upstream_json_is_refused_with_its_reason(proxy: Any, upstream: FakeUpstream) -> None:
    # Two readers of this reply would disagree on the text (first or last key wins): it is not relayed.
    text = json.dumps(message_json("Hello!"))
    body = text.replace('"text": "Hello!"', f'"text": "{KEY}", "text": "Hello!"').encode()
    assert body.count(b'"text":') == 2
    upstream.expect(Script(body=body, headers={"content-type": "application/json"}))
    with pytest.raises(anthropic.InternalServerError) as caught:
        anthropic_client(proxy).messages.create(model="claude-sonnet-4-6", max_tokens=10,
                                                messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 502
    assert "ambiguous JSON" in str(caught.value) and KEY not in str(caught.value)
    log = proxy.log()
    assert "upstream response refused" in log and "Traceback" not in log and KEY not in log


def test_stream_cut_midway_never_flushes_the_held_tail(proxy: Any, upstream: FakeUpstream) -> None:
    events = anthropic_stream(["Your key: sk-ant-", "api03-Zz9Yy8Xx7Ww6"])
    upstream.expect(Script(events=events, headers=SSE, cut_after=5))  # both deltas sent, then cut
    with http_client(proxy) as client:
        r = client.post(proxy.url + "/v1/messages", json={
            "model": "m", "max_tokens": 10, "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200
    assert b"sk-ant-" not in r.content and b"Zz9Yy8" not in r.content
    assert b"event: error" in r.content


def _raw(proxy: Any, method: str, path: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """A request with the path sent exactly as given (no client-side normalisation)."""
    import http.client

    conn = http.client.HTTPSConnection("127.0.0.1", proxy.port, context=proxy.ssl_context(), timeout=10)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        conn.putheader("content-type", "application/json")
        conn.putheader("content-length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


@pytest.mark.parametrize("path", [
    "/v1/messages/", "/v1/messages;x=1", "/v1/messages#frag", "/v1/%6Dessages", "/v1/Messages",
    "/V1/messages", "/openai/v1/chat/completions/", "/openai/v1/Chat/Completions", "/v1/messages/count_tokens/",
])
def test_routes_fail_closed(proxy: Any, upstream: FakeUpstream, path: str) -> None:
    body = json.dumps({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "my password"}]})
    status, _, answer = _raw(proxy, "POST", path, body.encode())
    assert status in (400, 404)
    assert "error" in json.loads(answer)
    assert upstream.requests == []  # nothing reached the upstream under another reading of the path


def test_json_masking_is_signalled_and_tool_input_kept(proxy: Any, upstream: FakeUpstream) -> None:
    reply = message_json(TEXT)
    reply["content"].append({"type": "tool_use", "id": "toolu_1", "name": "Write",
                             "input": {"file_path": "/tmp/a", "content": TEXT}})
    upstream.expect(Script(body=json.dumps(reply).encode(), headers={"content-type": "application/json"}))
    body = json.dumps({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
    status, headers, answer = _raw(proxy, "POST", "/v1/messages", body.encode())
    assert status == 200
    assert headers["x-ccproxy-masked"] == ("anthropic_api_key=1, credit_card=1, email=1, phone_number=1")
    content = json.loads(answer)["content"]
    assert KEY not in content[0]["text"]
    assert content[1]["input"] == {"file_path": "/tmp/a", "content": TEXT}


def test_stream_masking_is_signalled_in_a_comment_line(proxy: Any, upstream: FakeUpstream) -> None:
    upstream.expect(Script(events=anthropic_stream(pieces(TEXT, 5)), headers=SSE))
    body = json.dumps({"model": "m", "max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    status, headers, answer = _raw(proxy, "POST", "/v1/messages", body.encode())
    assert status == 200 and "x-ccproxy-masked" not in headers
    assert b"\n: ccproxy-masked anthropic_api_key=1\n" in b"\n" + answer
    assert KEY.encode() not in answer


@pytest.mark.parametrize(("path", "reply", "secret_field"), [
    ("/openai/v1/responses", {"id": "resp_1", "object": "response", "output": [
        {"type": "message", "id": "m", "role": "assistant", "content": [
            {"type": "output_text", "text": TEXT, "annotations": []}]}]}, "output"),
    ("/openai/v1/completions", {"id": "c", "object": "text_completion", "choices": [
        {"index": 0, "text": TEXT, "finish_reason": "stop"}]}, "choices"),
    ("/v1/complete", {"type": "completion", "completion": TEXT, "stop_reason": "stop_sequence"}, "completion"),
    ("/v1/models", {"data": [{"id": "m", "display_name": TEXT}]}, "data"),
])
def test_every_model_route_reply_is_masked(proxy: Any, upstream: FakeUpstream, path: str, reply: dict[str, Any],
                                           secret_field: str) -> None:
    upstream.expect(Script(body=json.dumps(reply).encode(), headers={"content-type": "application/json"}))
    method = "GET" if path.endswith("models") else "POST"
    body = b"" if method == "GET" else json.dumps({"model": "m", "prompt": "hi", "input": "hi"}).encode()
    status, _, answer = _raw(proxy, method, path, body)
    assert status == 200
    assert KEY.encode() not in answer and b"ops@example.com" not in answer
    assert secret_field in json.loads(answer)


def test_batch_results_lines_are_masked(proxy: Any, upstream: FakeUpstream) -> None:
    lines = [json.dumps({"custom_id": f"r{i}", "result": {"type": "succeeded", "message": message_json(TEXT)}})
             for i in range(3)]
    upstream.expect(Script(body="\n".join(lines).encode() + b"\n",
                           headers={"content-type": "application/binary"}))
    status, _, answer = _raw(proxy, "GET", "/v1/messages/batches/msgbatch_01/results")
    assert status == 200
    assert KEY.encode() not in answer
    assert [json.loads(line)["custom_id"] for line in answer.splitlines() if line] == ["r0", "r1", "r2"]


def test_model_error_bodies_are_masked(proxy: Any, upstream: FakeUpstream) -> None:
    error = {"type": "error", "error": {"type": "invalid_request_error", "message": f"bad key {KEY}"}}
    upstream.expect(Script(status=400, body=json.dumps(error).encode(), headers={"content-type": "application/json"}))
    body = json.dumps({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
    status, _, answer = _raw(proxy, "POST", "/v1/messages", body.encode())
    assert status == 400
    assert json.loads(answer)["error"]["message"] == "bad key [REDACTED_API_KEY]"


def test_streamed_tool_input_reaches_the_sdk_intact(daemon: Any, upstream: FakeUpstream) -> None:
    from tests.support.upstream import message_stream

    proxy = daemon({"security": {"response_sanitization": {"enabled": True}}})  # the default parts
    tool_input = {"file_path": "/home/dev/.env", "content": TEXT + "\nDB_PASSWORD=hunter2\n"}
    events = message_stream("msg_tool", [{"type": "text", "text": TEXT},
                                         {"type": "tool_use", "id": "toolu_1", "name": "Write", "input": tool_input}],
                            piece=3)
    upstream.expect(Script(events=events, headers=SSE))
    with anthropic_client(proxy).messages.stream(model="m", max_tokens=5,
                                                 messages=[{"role": "user", "content": "hi"}]) as stream:
        final = stream.get_final_message()
    text, call = final.content
    assert text.type == "text" and KEY not in text.text and "[REDACTED_API_KEY]" in text.text
    assert call.type == "tool_use" and call.input == tool_input


def test_a_cut_stream_still_reports_what_was_masked(proxy: Any, upstream: FakeUpstream) -> None:
    events = anthropic_stream(pieces(TEXT, 5))
    upstream.expect(Script(events=events, headers=SSE, cut_after=len(events) - 3))
    body = json.dumps({"model": "m", "max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    status, _, answer = _raw(proxy, "POST", "/v1/messages", body.encode())
    assert status == 200 and KEY.encode() not in answer
    deadline = time.monotonic() + 10
    while "response_masked" not in proxy.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "response_masked" in proxy.log()
