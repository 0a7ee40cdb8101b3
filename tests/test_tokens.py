"""Token usage read from replies, in memory: every shape, streamed at any split, masking on or off."""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.web.http_headers import Headers

from ccproxy.content.layer import ContentLayer
from ccproxy.content.usage import Usage
from tests.support.upstream import message_stream
from tests.test_content_validation import make_ctx, messages_body, parse


def test_anthropic_stream_usage_latest_counts_win() -> None:
    usage = Usage()
    usage.note({"type": "message_start", "message": {"usage": {
        "input_tokens": 10, "output_tokens": 1, "cache_creation_input_tokens": 3, "cache_read_input_tokens": 4}}})
    usage.note({"type": "message_delta", "usage": {"output_tokens": 25}})
    usage.note({"type": "message_delta", "usage": {"output_tokens": 40}})
    assert usage.fields() == {"input_tokens": 10, "output_tokens": 40, "cache_creation_input_tokens": 3,
                              "cache_read_input_tokens": 4}
    assert usage.total == 50


@pytest.mark.parametrize(("value", "expected"), [
    ({"usage": {"prompt_tokens": 12, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 8}}},
     (12, 5, 0, 8)),
    ({"type": "response.completed", "response": {"usage": {
        "input_tokens": 7, "output_tokens": 2, "input_tokens_details": {"cached_tokens": 1}}}}, (7, 2, 0, 1)),
    ({"usage": {"input_tokens": -1, "output_tokens": True}}, (0, 0, 0, 0)),
    ({"usage": "lots"}, (0, 0, 0, 0)),
])
def test_usage_shapes(value: dict[str, Any], expected: tuple[int, ...]) -> None:
    usage = Usage()
    usage.note(value)
    assert tuple(usage.fields().values()) == expected


STREAM = b"".join(message_stream("msg_u", [{"type": "text", "text": "hello bob@example.com"}],
                                 usage={"input_tokens": 120, "output_tokens": 1}))


OUTPUT = next(json.loads(line[6:])["usage"]["output_tokens"] for line in STREAM.split(b"\n")
              if line.startswith(b"data: ") and b"message_delta" in line)


@pytest.mark.parametrize("masking", [True, False])
def test_stream_usage_at_every_split(masking: bool) -> None:
    security = {"response_sanitization": {"enabled": masking}}
    layer = ContentLayer(parse(security))
    headers = Headers({b"content-type": [b"text/event-stream"]})
    for cut in range(0, len(STREAM) + 1, 7):
        ctx = make_ctx(messages_body())
        f = layer.response_filter(ctx, 200, headers)
        assert f is not None
        out = f.feed(STREAM[:cut]) + f.feed(STREAM[cut:]) + f.close()
        assert (ctx.usage.input_tokens, ctx.usage.output_tokens) == (120, OUTPUT)
        assert (out == STREAM) is not masking  # masking off: byte for byte


def test_usage_read_from_json_with_masking_off_keeps_the_body_and_its_length() -> None:
    layer = ContentLayer(parse({}))
    body = json.dumps({"type": "message", "content": [], "usage": {"input_tokens": 9, "output_tokens": 2}}).encode()
    ctx = make_ctx(messages_body())
    f = layer.response_filter(ctx, 200, Headers({b"content-type": [b"application/json"]}))
    assert f is not None and getattr(f, "transparent", False)
    assert f.feed(body[:10]) + f.feed(body[10:]) + f.close() == body
    assert ctx.usage.fields()["input_tokens"] == 9


def test_a_cut_stream_keeps_what_it_saw() -> None:
    layer = ContentLayer(parse({"response_sanitization": {"enabled": True}}))
    ctx = make_ctx(messages_body())
    f = layer.response_filter(ctx, 200, Headers({b"content-type": [b"text/event-stream"]}))
    assert f is not None
    f.feed(STREAM[: STREAM.index(b"content_block_start")])  # only message_start arrived
    assert (ctx.usage.input_tokens, ctx.usage.output_tokens) == (120, 1)
