"""Request validation and the content config, driven through the layer in memory."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import pytest
from twisted.web.http_headers import Headers

from ccproxy.config._reader import ConfigError, Section
from ccproxy.config.content import ContentConfig
from ccproxy.config.server import UpstreamConfig
from ccproxy.content.layer import ContentLayer
from ccproxy.context import RequestContext
from ccproxy.errors import ApiError
from ccproxy.routes import Route
from tests.support.content import seed_content
from tests.support.requests import FakeRequest

SEED = seed_content()


def parse(security: dict[str, Any]) -> ContentConfig:
    root = Section({"security": security}, "")
    config = ContentConfig.parse(root)
    root.done()
    return config


def make_ctx(body: bytes, kind: str = "messages", api: str = "anthropic") -> RequestContext:
    request = FakeRequest(b"POST", b"/v1/messages", headers={b"accept-encoding": [b"gzip, br"]})
    upstream = UpstreamConfig(name=api, base_url="https://example.invalid", api_key=None)
    return RequestContext(request=request, request_id="req_test", route=Route(api, upstream, b"/v1/messages", kind),
                          client_ip="127.0.0.1", started=0.0, body=body, method=b"POST", path=b"/v1/messages",
                          headers=request.request_headers.copy())


def check(layer: ContentLayer, ctx: RequestContext) -> None:
    asyncio.run(layer.check_body(ctx))


def refusal(layer: ContentLayer, ctx: RequestContext) -> ApiError:
    with pytest.raises(ApiError) as caught:
        check(layer, ctx)
    assert caught.value.status == 400
    assert caught.value.error_type == "invalid_request_error"
    return caught.value


def messages_body(**extra: Any) -> bytes:
    body = {"model": "m", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}], **extra}
    return json.dumps(body).encode()


LAYER = ContentLayer(parse(SEED))


def test_seed_config_is_accepted() -> None:
    config = parse(SEED)
    assert config.request_validation.blocked_patterns == ("(?i)api[_-]?key", "(?i)password", "<script")
    assert config.request_validation.strip_control_characters is True
    assert config.response_sanitization.mask_patterns[0].name == "credit_card"


@pytest.mark.parametrize(
    ("security", "path"),
    [
        ({"request_validation": {"blocked_patterns": ["(?<=a)b"]}}, "security.request_validation.blocked_patterns[0]"),
        ({"response_sanitization": {"mask_patterns": [{"name": "x", "pattern": "(a"}]}},
         "security.response_sanitization.mask_patterns[0].pattern"),
        ({"response_sanitization": {"mask_patterns": [{"name": "x", "pattern": "a?"}]}},
         "security.response_sanitization.mask_patterns[0].pattern"),
        ({"response_sanitization": {"mask_patterns": [{"name": "x", "pattern": "a"}, {"name": "x", "pattern": "b"}]}},
         "security.response_sanitization.mask_patterns[1].name"),
        ({"response_sanitization": {"mask_patterns": [{"pattern": "a"}]}},
         "security.response_sanitization.mask_patterns[0].name"),
        ({"request_validation": {"max_token": 5}}, "security.request_validation.max_token"),
        ({"request_validation": {"max_messages": 0}}, "security.request_validation.max_messages"),
    ],
)
def test_bad_config_names_the_path(security: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(security)
    assert caught.value.path == path


def test_sections_off_by_default() -> None:
    config = parse({})
    assert not config.request_validation.enabled and not config.response_sanitization.enabled
    ctx = make_ctx(b"not json")
    check(ContentLayer(config), ctx)  # nothing validated, nothing refused


def test_valid_request_passes_untouched(seen_events: list[dict[str, Any]]) -> None:
    body = messages_body(system=[{"type": "text", "text": "Be brief.\n\tOK"}])
    ctx = make_ctx(body)
    check(LAYER, ctx)
    assert ctx.body == body
    assert not ctx.headers.hasHeader(b"accept-encoding")
    assert ctx.request.request_headers.getRawHeaders(b"accept-encoding") == [b"gzip, br"]  # as the client sent it
    assert not seen_events


@pytest.mark.parametrize(
    ("body", "rule", "words"),
    [
        (messages_body(max_tokens=100001), "max_tokens", "max_tokens exceeds the limit of 100000"),
        (json.dumps({"model": "m", "max_completion_tokens": 200000, "messages": []}).encode(), "max_tokens",
         "max_completion_tokens exceeds"),
        (json.dumps({"model": "m", "max_tokens": 1,
                     "messages": [{"role": "user", "content": "x"}] * 101}).encode(), "max_messages",
         "101 messages exceed the limit of 100"),
        (messages_body(messages=[{"role": "user", "content": "x" * 50001}]), "max_message_length",
         "50001 characters exceeds the limit of 50000"),
        (messages_body(system="y" * 50001), "max_message_length", "exceeds the limit of 50000"),
        (messages_body(messages=[{"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "text", "text": "z" * 50001}]}]}]),
         "max_message_length", "exceeds the limit"),
    ],
)
def test_limits_refuse_with_the_rule(body: bytes, rule: str, words: str, seen_events: list[dict[str, Any]]) -> None:
    kind = "chat_completions" if b"max_completion_tokens" in body else "messages"
    error = refusal(LAYER, make_ctx(body, kind=kind))
    assert words in error.message
    assert [e["ccproxy_event"] for e in seen_events] == ["invalid_request"]
    assert seen_events[0]["rule"] == rule and seen_events[0]["request_id"] == "req_test"


@pytest.mark.parametrize(
    ("content", "index"),
    [
        ("my API_KEY is hunter2", 0),
        ([{"type": "text", "text": "the PassWord is hunter2"}], 1),
        ([{"type": "tool_result", "tool_use_id": "t", "content": "<script>alert(1)</script>"}], 2),
    ],
)
def test_blocked_patterns_never_echo_the_text(content: Any, index: int, seen_events: list[dict[str, Any]]) -> None:
    error = refusal(LAYER, make_ctx(messages_body(messages=[{"role": "user", "content": content}])))
    assert error.message == f"request blocked by content rule blocked_patterns[{index}]"
    assert "hunter2" not in str(seen_events) and "script>" not in str(seen_events)
    assert seen_events[0]["rule"] == f"blocked_patterns[{index}]"


@pytest.mark.parametrize("messages", [
    [{"role": "system", "content": "my password"}, {"role": "user", "content": "fine"}],
    [{"role": "system", "content": "fine"}, {"role": "user", "content": [{"type": "text", "text": "my password"}]}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x"}},
                                  {"type": "text", "text": "my password"}]}],
], ids=["system_string", "text_part", "text_after_image"])
def test_openai_message_shapes_are_read(messages: list[dict[str, Any]], seen_events: list[dict[str, Any]]) -> None:
    def ctx(messages: list[dict[str, Any]]) -> RequestContext:
        return make_ctx(json.dumps({"model": "gpt", "messages": messages}).encode(), kind="chat_completions",
                        api="openai")

    check(LAYER, ctx(json.loads(json.dumps(messages).replace("my password", "my pass"))))  # passes without it
    error = refusal(LAYER, ctx(messages))
    assert error.message == "request blocked by content rule blocked_patterns[1]"  # the pattern "(?i)password"
    assert [e["rule"] for e in seen_events] == ["blocked_patterns[1]"]


@pytest.mark.parametrize("body", [b"{not json", b"", b"\xff\xfe", b"[1, 2]", b'"text"',
                                  b'{"messages": "no"}', b'{"max_tokens": "many"}'])
def test_malformed_bodies_are_400(body: bytes, seen_events: list[dict[str, Any]]) -> None:
    refusal(LAYER, make_ctx(body))
    assert seen_events[0]["ccproxy_event"] == "invalid_request"


def test_control_characters_are_removed_before_forwarding() -> None:
    body = {"model": "m", "max_tokens": 5, "system": "sys\x07tem", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "a\x00b\r\nc\td\x1b[31m"}]},
        {"role": "assistant", "content": "keep\nthis"},
    ]}
    ctx = make_ctx(json.dumps(body).encode())
    check(LAYER, ctx)
    forwarded = json.loads(ctx.body)
    assert forwarded["system"] == "system"
    assert forwarded["messages"][0]["content"][0]["text"] == "ab\nc\td[31m"
    assert forwarded["messages"][1]["content"] == "keep\nthis"


def test_control_characters_kept_when_switched_off() -> None:
    layer = ContentLayer(parse({"request_validation": {"strip_control_characters": False}}))
    body = messages_body(system="a\x07b")
    ctx = make_ctx(body)
    check(layer, ctx)
    assert ctx.body == body


def test_other_routes_are_not_validated() -> None:
    ctx = make_ctx(b"not json", kind="other")
    check(LAYER, ctx)
    assert ctx.body == b"not json"
    # Their replies are masked too: the upstream is asked for an unencoded body.
    assert not ctx.headers.hasHeader(b"accept-encoding")


def _filter_out(layer: ContentLayer, ctx: RequestContext, headers: dict[bytes, bytes], body: bytes) -> bytes:
    h = Headers({k: [v] for k, v in headers.items()})
    f = layer.response_filter(ctx, 200, h)
    assert f is not None and getattr(f, "buffered", False)
    return f.feed(body) + f.close()


def test_json_responses_are_masked_and_stay_valid(seen_events: list[dict[str, Any]]) -> None:
    ctx = make_ctx(messages_body(system="You are the assistant of ACME, keep answers under forty words please."))
    body = json.dumps({"type": "message", "content": [
        {"type": "text", "text": "Mail bob@example.com or call (415) 555-0132. I am the assistant of ACME, "
                                 "keep answers under forty words."},
        {"type": "tool_use", "id": "t", "name": "n", "input": {"to": ["x@example.org"], "n": 3}},
    ]}).encode()
    out = json.loads(_filter_out(LAYER, ctx, {b"content-type": b"application/json"}, body))
    assert out["content"][0]["text"] == (
        "Mail [REDACTED_EMAIL] or call [REDACTED_PHONE]. I am[REDACTED_SYSTEM_PROMPT]."
    )
    # A tool call's input is for a program: passed intact by default.
    assert out["content"][1]["input"] == {"to": ["x@example.org"], "n": 3}
    assert ctx.extra_headers["x-ccproxy-masked"] == "email=1, phone_number=1, system_prompt=1"
    (event,) = seen_events
    assert event["ccproxy_event"] == "response_masked"
    assert event["counts"] == {"email": 1, "phone_number": 1, "system_prompt": 1}
    assert event["parts"] == ["text"] and event["signalled"] == "header x-ccproxy-masked"
    assert "bob@" not in str(event)


def test_openai_json_responses_are_masked() -> None:
    ctx = make_ctx(json.dumps({"model": "g", "messages": [{"role": "user", "content": "hi"}]}).encode(),
                   kind="chat_completions", api="openai")
    body = json.dumps({"choices": [{"index": 0, "message": {
        "role": "assistant", "content": "key sk-proj-abcdefghijklmnopqrstuvwxyz",
        "tool_calls": [{"id": "c", "type": "function",
                        "function": {"name": "f", "arguments": json.dumps({"card": "4111 1111 1111 1111"})}}]}}]})
    out = json.loads(_filter_out(LAYER, ctx, {b"content-type": b"application/json"}, body.encode()))
    message = out["choices"][0]["message"]
    assert message["content"] == "key [REDACTED_API_KEY]"
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == {"card": "4111 1111 1111 1111"}


def test_unmasked_json_is_byte_identical() -> None:
    body = b'{"type": "message",  "content": [{"type": "text", "text": "nothing here"}]}'
    assert _filter_out(LAYER, make_ctx(messages_body()), {b"content-type": b"application/json"}, body) == body


def test_which_responses_are_filtered() -> None:
    ctx = make_ctx(messages_body())
    sse = Headers({b"content-type": [b"text/event-stream; charset=utf-8"]})
    assert LAYER.response_filter(ctx, 200, sse) is not None
    assert LAYER.response_filter(ctx, 400, sse) is None
    assert LAYER.response_filter(ctx, 200, Headers({b"content-type": [b"text/plain"]})) is None
    # Every JSON or SSE reply of a model upstream is masked, whatever the route.
    assert LAYER.response_filter(make_ctx(b"{}", kind="count_tokens"), 200, sse) is not None
    assert LAYER.response_filter(make_ctx(b"{}", kind="other"), 200, sse) is not None
    # Error bodies from the model are read by people too.
    assert LAYER.response_filter(ctx, 400, Headers({b"content-type": [b"application/json"]})) is not None
    # Masking off: the reply is only read for its token usage, and passed as it came.
    assert getattr(ContentLayer(parse({})).response_filter(ctx, 200, sse), "transparent", False)
    assert ContentLayer(parse({})).response_filter(make_ctx(b"{}", kind="models"), 200, sse) is None
    with pytest.raises(ApiError) as caught:
        LAYER.response_filter(ctx, 200, Headers({b"content-type": [b"application/json"],
                                                 b"content-encoding": [b"br"]}))
    assert caught.value.status == 502


def test_example_config_keeps_the_seed_as_a_commented_profile() -> None:
    from pathlib import Path

    import yaml

    from ccproxy.config import load

    example = Path(__file__).resolve().parents[1] / "etc" / "ccproxy" / "config.yaml"
    content = load(str(example), environ={}).content
    assert content.request_validation.blocked_patterns == ()
    # The seed's values, uncommented, are a valid config of their own and equal to SEED.
    text = example.read_text()
    profile = text.split("# --- seed profile ---\n")[1].split("# --- end ---")[0]
    seed = "\n".join(line.split("# ", 1)[1] for line in profile.splitlines() if "# " in line)
    assert parse(yaml.safe_load(seed)["security"]).request_validation == parse(SEED).request_validation


def test_switched_off_sections_are_still_checked() -> None:
    config = parse({"request_validation": {"enabled": False, "max_tokens": 5},
                    "response_sanitization": {"enabled": False, "mask_emails": False}})
    assert not config.request_validation.enabled and not config.response_sanitization.enabled
    layer = ContentLayer(config)
    assert layer.validator is None and layer.rules is None
    with pytest.raises(ConfigError) as caught:
        parse({"request_validation": {"enabled": False, "blocked_patterns": ["(?<=x)"]}})
    assert caught.value.path == "security.request_validation.blocked_patterns[0]"


def test_json_reply_that_is_not_json_is_masked_as_text() -> None:
    body = b"oops sk-proj-abcdefghijklmnopqrstuvwxyz \xff tail"
    out = _filter_out(LAYER, make_ctx(messages_body()), {b"content-type": b"application/json"}, body)
    assert out == b"oops [REDACTED_API_KEY] \xff tail"


def _refused_by(body: dict[str, Any], kind: str = "messages", api: str = "anthropic") -> str:
    return refusal(LAYER, make_ctx(json.dumps(body).encode(), kind=kind, api=api)).message


B64 = base64.b64encode(b"the password is hunter2").decode()
BLOCKED = "request blocked by content rule blocked_patterns[1]"


@pytest.mark.parametrize("block", [
    {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "my password"}},
    {"type": "document", "source": {"type": "base64", "media_type": "text/plain", "data": B64}},
    {"type": "document", "title": "password list", "source": {"type": "text", "data": "x"}},
    {"type": "document", "context": "password", "source": {"type": "url", "url": "https://x"}},
    {"type": "document", "source": {"type": "content", "content": [{"type": "text", "text": "password"}]}},
    {"type": "search_result", "source": "s", "title": "t", "content": [{"type": "text", "text": "password"}]},
    {"type": "tool_result", "tool_use_id": "t", "content": [
        {"type": "search_result", "source": "s", "title": "t", "content": [{"type": "text", "text": "password"}]}]},
    {"type": "tool_result", "tool_use_id": "t", "content": [
        {"type": "document", "source": {"type": "base64", "media_type": "text/plain", "data": B64}}]},
    {"type": "tool_use", "id": "t", "name": "Write", "input": {"deep": [{"content": "password"}]}},
    {"type": "thinking", "thinking": "the password", "signature": "sig"},
    {"type": "text", "text": "x", "citations": [{"type": "char_location", "cited_text": "password"}]},
    {"type": "future_block", "payload": {"words": "password"}},
])
def test_every_anthropic_block_a_model_reads_is_checked(block: dict[str, Any]) -> None:
    body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [block]}]}
    assert _refused_by(body) == BLOCKED


def test_tool_definitions_are_checked_on_both_apis() -> None:
    tool = {"name": "t", "description": "reads a password", "input_schema": {"type": "object"}}
    assert _refused_by({"model": "m", "max_tokens": 5, "messages": [], "tools": [tool]}) == BLOCKED
    function = {"type": "function", "function": {"name": "f", "description": "x", "parameters": {
        "type": "object", "properties": {"p": {"type": "string", "description": "the password"}}}}}
    assert _refused_by({"model": "g", "messages": [], "tools": [function]}, "chat_completions", "openai") == BLOCKED


@pytest.mark.parametrize("message", [
    {"role": "user", "content": [{"type": "file", "file": {
        "filename": "a.txt", "file_data": "data:text/plain;base64," + B64}}]},
    {"role": "user", "content": [{"type": "file", "file": {"filename": "password.txt", "file_id": "f"}}]},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{\"p\": \"password\"}"}}]},
    {"role": "assistant", "refusal": "no password"},
    {"role": "user", "name": "password", "content": "hi"},
])
def test_every_openai_part_a_model_reads_is_checked(message: dict[str, Any]) -> None:
    assert _refused_by({"model": "g", "messages": [message]}, "chat_completions", "openai") == BLOCKED


@pytest.mark.parametrize(("kind", "body"), [
    ("responses", {"model": "g", "input": "my password"}),
    ("responses", {"model": "g", "instructions": "password", "input": "hi"}),
    ("responses", {"model": "g", "input": [{"role": "user", "content": [{"type": "input_text", "text": "password"}]}]}),
    ("responses", {"model": "g", "input": [{"type": "function_call_output", "call_id": "c", "output": "password"}]}),
    ("completions", {"model": "g", "prompt": "password"}),
    ("completions", {"model": "g", "prompt": ["ok", "password"]}),
    ("complete", {"model": "c", "prompt": "\n\nHuman: password\n\nAssistant:", "max_tokens_to_sample": 5}),
    ("batches", {"requests": [{"custom_id": "a", "params": {"model": "m", "max_tokens": 5, "messages": [
        {"role": "user", "content": "password"}]}}]}),
])
def test_every_model_endpoint_is_checked(kind: str, body: dict[str, Any]) -> None:
    api = "anthropic" if kind in ("complete", "batches") else "openai"
    assert _refused_by(body, kind, api) == BLOCKED


def test_batch_params_get_every_limit() -> None:
    body = {"requests": [{"custom_id": "a", "params": {"model": "m", "max_tokens": 100001, "messages": []}}]}
    assert "max_tokens exceeds" in _refused_by(body, "batches")


@pytest.mark.parametrize("spelling", [
    "pass\u200bword", "pass\u00adword", "pass\u0085word", "ｐａｓｓｗｏｒｄ", "pаsswоrd",  # Cyrillic а, о
    "PASS\u2060WORD", "pass\ufeffword",
])
def test_disguised_spellings_are_normalised_before_patterns(spelling: str) -> None:
    assert _refused_by({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": spelling}]}) == BLOCKED


def test_what_is_forwarded_is_what_the_client_sent_but_for_control_characters() -> None:
    layer = ContentLayer(parse({"request_validation": {"blocked_patterns": ["forbidden"]}}))
    text = "ｆｕｌｌ width, zero\u200bwidth, C1\u0085 and \x07 bell"
    ctx = make_ctx(json.dumps({"model": "m", "max_tokens": 5, "messages": [
        {"role": "user", "content": text}]}).encode())
    check(layer, ctx)
    assert json.loads(ctx.body)["messages"][0]["content"] == "ｆｕｌｌ width, zero\u200bwidth, C1 and  bell"


@pytest.mark.parametrize(("raw", "words"), [
    (b'{"model":"m","max_tokens":5,"messages":[],"messages":[{"role":"user","content":"password"}]}', "duplicate key"),
    (b'{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"a","content":"b"}]}', "duplicate key"),
    (b'{"model":"m","max_tokens":NaN,"messages":[]}', "non-finite"),
    (b'{"model":"m","max_tokens":-Infinity,"messages":[]}', "non-finite"),
    (b'{"model":"m","max_tokens":1e999,"messages":[]}', "out of range"),
    (b'{"model":"m","max_tokens":123456789012345678901,"messages":[]}', "out of range"),
    (b'{"model":"m","max_tokens":-5,"messages":[]}', "max_tokens must be a positive integer"),
    (b'{"model":"m","max_tokens":100000.00000000000001,"messages":[]}', "max_tokens must be a positive integer"),
    (b'{"model":"m","max_tokens":5.0,"messages":[]}', "max_tokens must be a positive integer"),
])
def test_ambiguous_json_and_numbers_are_refused(raw: bytes, words: str) -> None:
    assert words in refusal(LAYER, make_ctx(raw)).message


def test_invalid_base64_document_is_refused() -> None:
    block = {"type": "document", "source": {"type": "base64", "media_type": "text/plain", "data": "not base64!"}}
    assert "base64" in _refused_by({"model": "m", "max_tokens": 5, "messages": [
        {"role": "user", "content": [block]}]})


def test_a_long_document_is_held_to_the_length_limit() -> None:
    block = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x" * 200000}}
    assert "exceeds the limit of 50000" in _refused_by({"model": "m", "max_tokens": 5, "messages": [
        {"role": "user", "content": [block]}]})


def test_a_claude_code_session_passes_the_example_config() -> None:
    from pathlib import Path

    from ccproxy.config import load

    example = Path(__file__).resolve().parents[1] / "etc" / "ccproxy" / "config.yaml"
    layer = ContentLayer(load(str(example), environ={}).content)
    file_text = "".join(f"DB_PASSWORD=secret{i} # password for the api_key <script>\n" for i in range(1400))
    messages: list[dict[str, Any]] = [{"role": "user", "content": "fix the login password check"}]
    for i in range(150):  # a long tool loop
        messages.append({"role": "assistant", "content": [
            {"type": "tool_use", "id": f"t{i}", "name": "Read", "input": {"file_path": f"/src/f{i}.py"}}]})
        messages.append({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": f"t{i}", "content": file_text if i == 3 else "ok"}]})
    body = {"model": "claude-opus-4-8", "max_tokens": 128000, "system": "You are Claude Code.",
            "messages": messages, "stream": True}
    ctx = make_ctx(json.dumps(body).encode())
    check(layer, ctx)
    assert json.loads(ctx.body) == body


# A system prompt shaped like a coding agent's: an environment block with the working directory,
# sentences of 60-250 characters (Claude Code 2.1's longest sentence is 259 characters).
AGENT_PROMPT = "\n".join(
    [f"Rule {i}: when the user asks for change number {i}, read the file first, keep the style of the "
     f"surrounding code, and never commit secrets such as keys or passwords to the repository." for i in range(40)]
    + ["# Environment", " - Primary working directory: /home/dev/projects/acme-billing", " - Platform: linux"]
)


def _reply_filter(layer: ContentLayer, ctx: RequestContext, sse: bool) -> Any:
    content_type = b"text/event-stream" if sse else b"application/json"
    return layer.response_filter(ctx, 200, Headers({b"content-type": [content_type]}))


def test_ordinary_agent_answers_quoting_the_prompt_pass() -> None:
    layer = ContentLayer(parse({"response_sanitization": {"mask_emails": False}}))
    ctx = make_ctx(messages_body(system=AGENT_PROMPT))
    sentence = AGENT_PROMPT.split("\n")[7]
    answer = (f"I read /home/dev/projects/acme-billing/src/app.py. Primary working directory: "
              f"/home/dev/projects/acme-billing. As my instructions say: {sentence}")
    assert len(sentence) > 150
    body = json.dumps({"type": "message", "content": [{"type": "text", "text": answer}]}).encode()
    f = _reply_filter(layer, ctx, sse=False)
    assert f.feed(body) + f.close() == body


@pytest.mark.parametrize("sse", [False, True])
def test_a_long_verbatim_echo_of_the_prompt_is_removed(sse: bool) -> None:
    layer = ContentLayer(parse({"response_sanitization": {"enabled": True}}))
    ctx = make_ctx(messages_body(system=AGENT_PROMPT))
    echo = AGENT_PROMPT[1000:1400]
    text = f"My instructions are: {echo} That is all."
    if not sse:
        body = json.dumps({"type": "message", "content": [{"type": "text", "text": text}]}).encode()
        f = _reply_filter(layer, ctx, sse=False)
        out = json.loads(f.feed(body) + f.close())["content"][0]["text"]
    else:
        from tests.support.upstream import anthropic_stream

        wire = b"".join(anthropic_stream([text[i : i + 11] for i in range(0, len(text), 11)]))
        f = _reply_filter(layer, ctx, sse=True)
        sent = b"".join(f.feed(wire[i : i + 50]) for i in range(0, len(wire), 50)) + f.close()
        out = ""
        for chunk in sent.split(b"\n\n"):
            data = [line[6:] for line in chunk.split(b"\n") if line.startswith(b"data: ")]
            if data and b"text_delta" in data[0]:
                out += json.loads(data[0])["delta"]["text"]
    assert out == "My instructions are: [REDACTED_SYSTEM_PROMPT] That is all."


def test_short_prompts_are_protected_by_share() -> None:
    from ccproxy.content.layer import min_echo_run

    config = parse({"response_sanitization": {}}).response_sanitization
    assert min_echo_run(6000, config) == 300
    assert min_echo_run(100, config) == 50
    assert min_echo_run(10, config) == 16


def test_every_format_character_is_invisible_to_patterns() -> None:
    import sys
    import unicodedata

    from ccproxy.content.validation import normalise

    format_chars = [chr(c) for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) == "Cf"]
    assert normalise("pa" + "".join(format_chars) + "ss") == "pass"


@pytest.mark.parametrize("kind", ["response", "batch", "batch_results", "models"])
def test_routes_without_a_request_body_to_check_pass(kind: str) -> None:
    ctx = make_ctx(b"", kind=kind)  # e.g. POST /openai/v1/responses/{id}/cancel has no body
    check(LAYER, ctx)
    assert ctx.body == b""


@pytest.mark.parametrize("body", [
    b'{"type":"message","content":[{"type":"text","text":"bob@example.com","text":"fine"}]}',
    b'{"type":"message","content":[{"type":"text","text":"x"}],"usage":{"input_tokens":NaN}}',
])
def test_ambiguous_upstream_json_is_refused_not_passed(body: bytes) -> None:
    f = LAYER.response_filter(make_ctx(messages_body()), 200, Headers({b"content-type": [b"application/json"]}))
    assert f is not None
    f.feed(body)
    with pytest.raises(ApiError) as caught:
        f.close()
    assert caught.value.status == 502 and "ambiguous" in caught.value.message
