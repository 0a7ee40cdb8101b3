"""Masking whole replies and SSE streams of each API shape, part by part: every place a person (or a program,
for tool inputs and structured output) reads text is masked when its kind is on, left byte for byte when
it is off, and shapes ccproxy does not expect pass without harm."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest

from ccproxy.content.masking import Masker, built_in_rules, rule_set
from ccproxy.content.parts import STRUCTURED_OUTPUTS, TEXT, THINKING, TOOL_INPUTS, Parts
from ccproxy.content.replies import (
    PartMasker,
    UnsafeReply,
    mask_any,
    mask_batch_line,
    mask_completion,
    mask_message,
    mask_responses,
    strict_loads,
)
from ccproxy.content.sse import (
    MAX_EVENT,
    AnthropicStream,
    EventSplitter,
    EventTooLarge,
    GenericStream,
    OpenAIStream,
    ResponsesStream,
    SseFilter,
    UsageObserver,
)

RULES = rule_set(built_in_rules(True, True, True))
MAIL = "john@example.com"
MASKED = "[REDACTED_EMAIL]"
ALL = Parts(True, True, True, True)
NONE = Parts(False, False, False, False)


def pm(parts: Parts = ALL, structured: bool = False) -> PartMasker:
    return PartMasker(lambda: Masker(RULES, None), parts, structured)


def said(text: str = "") -> str:
    return f"write to {MAIL}{text}"


# -- whole replies


def test_a_messages_reply_masks_text_citations_thinking_tool_input_and_legacy_completion() -> None:
    reply: dict[str, Any] = {"type": "message", "content": [
        {"type": "text", "text": said(), "citations": [{"cited_text": said(), "title": said(), "url": MAIL}, "odd"]},
        {"type": "thinking", "thinking": said(), "signature": MAIL},
        {"type": "tool_use", "id": "t", "name": "n", "input": {"to": [MAIL], MAIL: 1}},
        {"type": "server_tool_use", "input": said()},
        {"type": "text", "text": 42},  # not a string: left as it is
        "not a block",
    ], "completion": said()}
    m = pm()
    mask_message(reply, m)
    blocks = reply["content"]
    assert blocks[0]["text"] == f"write to {MASKED}"
    assert blocks[0]["citations"][0] == {"cited_text": f"write to {MASKED}", "title": f"write to {MASKED}", "url": MAIL}
    assert blocks[1] == {"type": "thinking", "thinking": f"write to {MASKED}", "signature": MAIL}
    assert blocks[2]["input"] == {"to": [MASKED], MAIL: 1}  # keys are names, not text
    assert blocks[3]["input"] == f"write to {MASKED}"
    assert blocks[4:] == [{"type": "text", "text": 42}, "not a block"]
    assert reply["completion"] == f"write to {MASKED}"
    assert m.counts == Counter(email=7) and m.altered == {TEXT, THINKING, TOOL_INPUTS}


def test_an_error_reply_is_masked_and_a_reply_that_is_not_an_object_is_left() -> None:
    reply: dict[str, Any] = {"type": "error", "error": {"type": "invalid_request_error", "message": said()}}
    mask_message(reply, pm())
    assert reply["error"]["message"] == f"write to {MASKED}"
    for odd in ([said()], said(), None):
        mask_message(odd, pm())
        mask_completion(odd, pm())
        mask_responses(odd, pm())
        mask_batch_line(odd, pm())


def test_parts_switched_off_pass_unchanged_and_nothing_is_counted() -> None:
    reply: dict[str, Any] = {"content": [{"type": "text", "text": said()}, {"type": "thinking", "thinking": said()},
                                         {"type": "tool_use", "input": {"a": MAIL}}]}
    before = json.dumps(reply)
    m = pm(NONE)
    mask_message(reply, m)
    assert json.dumps(reply) == before and m.counts == Counter() and m.altered == set()


def test_structured_output_is_its_own_kind() -> None:
    reply: dict[str, Any] = {"content": [{"type": "text", "text": json.dumps({"to": MAIL})}]}
    m = pm(Parts(structured_outputs=False), structured=True)
    mask_message(reply, m)
    assert json.loads(reply["content"][0]["text"]) == {"to": MAIL}
    m = pm(Parts(structured_outputs=True), structured=True)
    mask_message(reply, m)
    assert json.loads(reply["content"][0]["text"]) == {"to": MASKED} and m.altered == {STRUCTURED_OUTPUTS}


def test_a_chat_completion_masks_content_parts_refusals_and_tool_arguments() -> None:
    untouched = json.dumps({"city": "Paris"})
    reply: dict[str, Any] = {"error": {"message": said()}, "choices": [
        {"index": 0, "message": {"content": said(), "refusal": said(), "tool_calls": [
            {"function": {"arguments": json.dumps({"to": MAIL})}},
            {"function": {"arguments": untouched}},
            {"function": {"arguments": said("{not json")}},
            {"function": "odd"}, "odd"],
            "function_call": {"arguments": json.dumps([MAIL])}}},
        {"index": 1, "message": {"content": [{"type": "text", "text": said()}, {"type": "image"}, "odd"]}},
        {"index": 2, "text": said()},  # legacy Completions
        "odd",
    ]}
    mask_completion(reply, pm())
    first = reply["choices"][0]["message"]
    assert reply["error"] == {"message": f"write to {MASKED}"}
    assert first["content"] == first["refusal"] == f"write to {MASKED}"
    calls = first["tool_calls"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"to": MASKED}
    assert calls[1]["function"]["arguments"] is untouched  # nothing to mask: the upstream's own text
    assert calls[2]["function"]["arguments"] == f"write to {MASKED}{{not json"  # not JSON: masked as text
    assert json.loads(first["function_call"]["arguments"]) == [MASKED]
    assert reply["choices"][1]["message"]["content"][0]["text"] == f"write to {MASKED}"
    assert reply["choices"][2]["text"] == f"write to {MASKED}"


def test_tool_arguments_pass_when_tool_inputs_are_not_masked() -> None:
    arguments = json.dumps({"to": MAIL})
    reply: dict[str, Any] = {"choices": [{"message": {"tool_calls": [{"function": {"arguments": arguments}}]}}]}
    mask_completion(reply, pm(Parts()))
    assert reply["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] is arguments


def test_a_responses_reply_masks_messages_reasoning_and_tool_calls() -> None:
    reply: dict[str, Any] = {"error": {"message": said()}, "output_text": said(), "output": [
        {"type": "message", "content": [{"type": "output_text", "text": said()}, {"type": "refusal", "refusal": said()},
                                        "odd"]},
        {"type": "reasoning", "summary": [{"text": said()}, "odd"], "content": [{"text": said()}]},
        {"type": "function_call", "arguments": json.dumps({"to": MAIL})},
        {"type": "custom_tool_call", "input": said()},
        {"type": "web_search_call", "query": said()},  # not text a reply shows: left
        "odd",
    ]}
    m = pm()
    mask_responses(reply, m)
    out = reply["output"]
    assert reply["error"]["message"] == reply["output_text"] == f"write to {MASKED}"
    assert out[0]["content"][0]["text"] == out[0]["content"][1]["refusal"] == f"write to {MASKED}"
    assert out[1]["summary"][0]["text"] == out[1]["content"][0]["text"] == f"write to {MASKED}"
    assert json.loads(out[2]["arguments"]) == {"to": MASKED} and out[3]["input"] == f"write to {MASKED}"
    assert out[4]["query"] == said()
    assert m.altered == {TEXT, THINKING, TOOL_INPUTS}


def test_a_batch_results_line_masks_its_message_and_its_error() -> None:
    line: dict[str, Any] = {"custom_id": MAIL, "result": {"type": "succeeded", "message": {
        "content": [{"type": "text", "text": said()}]}, "error": {"message": said()}}}
    mask_batch_line(line, pm())
    assert line["custom_id"] == MAIL  # the caller's own id
    assert line["result"]["message"]["content"][0]["text"] == line["result"]["error"]["message"] == (
        f"write to {MASKED}")


def test_a_reply_of_an_unknown_shape_has_every_string_masked() -> None:
    value: Any = {"a": [said(), {"b": said()}], "n": 1}
    mask_any(value, pm())
    assert value == {"a": [f"write to {MASKED}", {"b": f"write to {MASKED}"}], "n": 1}
    text = said()
    mask_any(text, pm())  # a bare string cannot be changed in place: the caller masks it as text


@pytest.mark.parametrize("data", [b'{"a":1,"a":2}', b'{"a":NaN}', b"[Infinity]", b'{"x":{"y":-Infinity}}'])
def test_what_two_readers_could_read_differently_is_refused(data: bytes) -> None:
    with pytest.raises(UnsafeReply):
        strict_loads(data)


# -- streams


def _sse(*events: dict[str, Any], named: bool = True) -> bytes:
    out = b""
    for e in events:
        out += (f"event: {e['type']}\n".encode() if named else b"") + b"data: " + json.dumps(e).encode() + b"\n\n"
    return out


def _datas(out: bytes) -> list[Any]:
    return [json.loads(line[6:]) for line in out.split(b"\n") if line.startswith(b"data: ") and line != b"data: [DONE]"]


def _through(stream: Any, data: bytes, pieces: int = 1) -> bytes:
    counts: Counter[str] = stream.pm.counts
    closed: list[Counter[str]] = []
    f = SseFilter(stream, counts, closed.append)
    step = max(1, len(data) // pieces)
    out = b"".join(f.feed(data[i:i + step]) for i in range(0, len(data), step)) + f.close()
    assert closed == [counts]
    return out


def test_anthropic_stream_start_blocks_citations_errors_and_a_final_flush() -> None:
    events = _sse(
        {"type": "message_start", "message": {"content": [{"type": "text", "text": said()}]}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": said(" now"),
                                                                       "citations": [{"cited_text": said()}]}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "citations_delta",
                                                              "citation": {"cited_text": said()}}},
        {"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "input": {"a": MAIL}}},
        {"type": "content_block_delta", "index": 2, "delta": {"type": "thinking_delta", "thinking": "mail jo"}},
        {"type": "content_block_delta", "index": 2, "delta": "odd"},
        {"type": "content_block_delta", "index": 2, "delta": {"type": "signature_delta", "signature": MAIL}},
        {"type": "content_block_start", "index": 3, "content_block": "odd"},
        {"type": "error", "error": {"message": said()}},
        {"type": "message_stop"},
    )
    out = _through(AnthropicStream(pm()), events, pieces=7)
    assert MAIL.encode() in out  # the signature alone: not a person's text
    datas = _datas(out)
    assert datas[0]["message"]["content"][0]["text"] == f"write to {MASKED}"
    held = "".join(d["delta"].get("text", "") for d in datas if d["type"] == "content_block_delta" and d["index"] == 0)
    assert datas[1]["content_block"]["text"] + held == f"write to {MASKED} now"
    assert datas[1]["content_block"]["citations"][0]["cited_text"] == f"write to {MASKED}"
    assert datas[2]["delta"]["citation"]["cited_text"] == f"write to {MASKED}"
    assert datas[3]["content_block"]["input"] == {"a": MASKED}
    assert [d["error"]["message"] for d in datas if d["type"] == "error"] == [f"write to {MASKED}"]
    # The held tail of block 2 ("jo": could still grow into an address) comes out before message_stop.
    thinking = "".join(d["delta"].get("thinking", "") for d in datas if d.get("index") == 2
                       and isinstance(d["delta"], dict))
    assert thinking == "mail jo" and datas[-1] == {"type": "message_stop"}
    assert datas[-2] == {"type": "content_block_delta", "index": 2, "delta": {"type": "thinking_delta", "thinking": "jo"}}


def test_anthropic_stream_without_event_lines_flushes_unnamed_and_passes_other_json() -> None:
    events = _sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "to jo"}},
                  named=False)
    events += b'data: ["content_block_delta"]\n\n'  # JSON, not an object: passed as it is
    events += b'data: {"type": "content_block_delta", "index": "0"}\n\n'
    out = _through(AnthropicStream(pm()), events)
    assert b"event:" not in out
    assert b'data: ["content_block_delta"]\n\n' in out and b'"index": "0"' in out
    assert [d["delta"]["text"] for d in _datas(out) if isinstance(d, dict) and d.get("index") == 0] == ["to ", "jo"]


def test_data_that_is_not_json_is_masked_as_text_unless_text_is_off() -> None:
    # A garbled error event (cut JSON): what it says may still be shown to someone.
    raw = f'event: error\ndata: {{"type": "error", "message": "{said()}\n\n'.encode()
    out = _through(AnthropicStream(pm()), raw)
    assert out == b": ccproxy-masked email=1\n" + raw.replace(MAIL.encode(), MASKED.encode())
    assert _through(AnthropicStream(pm(NONE)), raw) == raw
    assert _through(OpenAIStream(pm()), f"data: {said()}\n\n".encode()).endswith(
        f"\ndata: write to {MASKED}\n\n".encode())
    comment = b": keep-alive\n\n"
    assert _through(AnthropicStream(pm()), b'event: content_block_stop\n' + comment) == (
        b'event: content_block_stop\n' + comment)


def test_openai_stream_text_completions_tool_calls_and_flush_into_a_new_delta() -> None:
    chunks = [
        {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "text": "mail jo"}]},
        {"id": "c", "choices": [{"index": 0, "text": "hn@example.com", "finish_reason": "stop"}]},
        {"id": "c", "choices": [{"index": 1, "delta": {"tool_calls": [
            {"index": 0, "function": {"arguments": '{"to": "jo'}}, "odd", {"index": "x", "function": {}}]}}]},
        {"id": "c", "choices": [{"index": 1, "delta": "odd", "finish_reason": "tool_calls"}]},
        {"error": {"message": said()}},
        {"id": "c", "choices": ["odd", {"index": "x"}]},
    ]
    raw = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"
    out = _through(OpenAIStream(pm()), raw, pieces=5)
    datas = _datas(out)
    assert "".join(d["choices"][0].get("text", "") for d in datas[:2]) == f"mail {MASKED}"
    tail = datas[3]["choices"][0]
    assert tail["finish_reason"] == "tool_calls"
    assert tail["delta"] == {"tool_calls": [{"index": 0, "function": {"arguments": "jo"}}]}
    assert datas[4] == {"error": {"message": f"write to {MASKED}"}}
    assert out.endswith(b"data: [DONE]\n\n")


def test_openai_stream_cut_before_its_finish_reason_flushes_on_close() -> None:
    raw = b'data: {"id":"c","model":"m","choices":[{"index":0,"text":"mail jo"}]}\n\n'
    out = _through(OpenAIStream(pm()), raw)
    last = _datas(out)[-1]
    assert last == {"id": "c", "model": "m", "choices": [{"index": 0, "finish_reason": None, "text": "jo"}]}


def test_responses_stream_masks_done_events_items_parts_and_errors() -> None:
    item = {"item_id": "i", "output_index": 0, "content_index": 0}
    events = _sse(
        {"type": "response.reasoning_text.delta", **item, "delta": "mail jo", "sequence_number": 1},
        {"type": "response.reasoning_text.done", **item, "text": f"mail {MAIL}"},
        {"type": "response.refusal.delta", "item_id": "r", "delta": "plain"},
        {"type": "response.refusal.done", "item_id": "r", "refusal": said()},
        {"type": "response.function_call_arguments.done", "arguments": json.dumps({"to": MAIL})},
        {"type": "response.output_item.done", "item": {"type": "message", "content": [{"text": said()}]}},
        {"type": "response.content_part.done", "part": {"text": said(), "refusal": said()}},
        {"type": "response.completed", "response": {"output_text": said()}},
        {"type": "error", "message": said(), "code": "x"},
        {"type": "response.output_text.delta", "item_id": "open", "delta": "mail jo"},
    )
    events += b"data: [1, 2]\n\n" + b"event: ping\n\n"
    out = _through(ResponsesStream(pm()), events, pieces=4)
    assert MAIL.encode() not in out
    datas = [d for d in _datas(out) if isinstance(d, dict)]
    kinds = [d["type"] for d in datas]
    # The held tail of the reasoning text, in one extra delta just before its .done event.
    at = kinds.index("response.reasoning_text.done")
    assert datas[at - 1] == {"type": "response.reasoning_text.delta", **item, "delta": "jo"}
    assert datas[at]["text"] == f"mail {MASKED}"
    assert datas[kinds.index("response.refusal.done")]["refusal"] == f"write to {MASKED}"
    assert json.loads(datas[kinds.index("response.function_call_arguments.done")]["arguments"]) == {"to": MASKED}
    assert datas[kinds.index("error")]["message"] == f"write to {MASKED}"
    # A part still open when the stream ends gives its tail at the close.
    assert datas[-1] == {"type": "response.output_text.delta", "item_id": "open", "delta": "jo"}
    assert b"data: [1, 2]\n\n" in out and out.count(b"event: ping\n\n") == 1


def test_responses_deltas_pass_when_their_kind_is_off() -> None:
    raw = _sse({"type": "response.output_text.delta", "item_id": "i", "delta": said()},
               {"type": "response.output_text.done", "item_id": "i", "text": said()})
    assert _through(ResponsesStream(pm(NONE)), raw) == raw


def test_a_generic_stream_masks_every_string_and_passes_the_rest() -> None:
    seen: list[dict[str, Any]] = []
    raw = b'data: {"a": "' + said().encode() + b'"}\n\n' + b"data: 7\n\n" + b'data: {"b": 1}\n\n'
    counts: Counter[str] = Counter()
    m = PartMasker(lambda: Masker(RULES, None), ALL, False, counts)
    out = SseFilter(GenericStream(m, seen.append), counts, lambda _: None, signal=False).feed(raw)
    assert out == b'data: {"a":"write to ' + MASKED.encode() + b'"}\n\n' + b"data: 7\n\n" + b'data: {"b": 1}\n\n'
    assert seen == [{"a": f"write to {MASKED}"}, {"b": 1}]


def test_the_client_is_told_what_was_masked_in_the_event_that_changed() -> None:
    counts: Counter[str] = Counter()
    m = PartMasker(lambda: Masker(RULES, None), ALL, False, counts)
    f = SseFilter(GenericStream(m), counts, lambda _: None)
    out = f.feed(b'data: {"a": "' + said().encode() + b'"}\n\ndata: {"b": 1}\n\n')
    assert out.startswith(b": ccproxy-masked email=1\ndata: ") and out.count(b"ccproxy-masked") == 1


def test_a_stream_that_ends_inside_an_event_still_has_it_masked() -> None:
    counts: Counter[str] = Counter()
    m = PartMasker(lambda: Masker(RULES, None), ALL, False, counts)
    f = SseFilter(GenericStream(m), counts, lambda _: None, signal=False)
    assert f.feed(b'data: {"a": "' + said().encode() + b'"}\n') == b""
    assert f.close() == b'data: {"a":"write to ' + MASKED.encode() + b'"}\n\n'
    f = SseFilter(GenericStream(m), counts, lambda _: None, signal=False)
    assert f.feed(b"\n\n") == b"\n\n" and f.close() == b""


@pytest.mark.parametrize("cut", [1, 2, 3, 5, 8])
def test_event_splitter_handles_crlf_split_between_reads(cut: int) -> None:
    data = b"data: a\r\n\r\ndata: b\r\rdata: c\n\n"
    splitter = EventSplitter()
    pieces = [data[i:i + cut] for i in range(0, len(data), cut)]
    events = [e for p in pieces for e in splitter.feed(p)]
    assert events == [b"data: a\n\n", b"data: b\n\n", b"data: c\n\n"] and splitter.rest() == b""


def test_an_event_larger_than_the_bound_cuts_the_stream() -> None:
    splitter = EventSplitter()
    splitter.feed(b"data: " + b"x" * (MAX_EVENT - 10))
    with pytest.raises(EventTooLarge):
        splitter.feed(b"x" * 20)


def test_usage_observer_reads_usage_from_streams_and_whole_bodies_and_changes_nothing() -> None:
    noted: list[dict[str, Any]] = []
    sse = UsageObserver(noted.append, sse=True)
    data = b'data: {"type": "message_delta", "usage": {"output_tokens": 3}}\n\ndata: {"usage": [bad json\n\n'
    assert sse.feed(data) == data
    assert sse.feed(b'data: {"usage": {"input_tokens": 5}}') == b'data: {"usage": {"input_tokens": 5}}'
    sse.close()  # the last event had no blank line: read at the end
    assert noted == [{"type": "message_delta", "usage": {"output_tokens": 3}}, {"usage": {"input_tokens": 5}}]
    noted.clear()
    body = UsageObserver(noted.append, sse=False)
    body.feed(b'{"usage": {"input_tokens": 1},')
    body.feed(b' "id": "x"}')
    body.close()
    assert noted == [{"usage": {"input_tokens": 1}, "id": "x"}]
    for bad in (b'{"a": 1, "a": 2}', b"\xff\xfe", b"[1]"):
        noted.clear()
        o = UsageObserver(noted.append, sse=False)
        o.feed(bad)
        o.close()
        assert noted == [], bad


def test_usage_observer_gives_up_on_a_body_beyond_its_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(UsageObserver, "MAX_OBSERVED", 16)
    noted: list[dict[str, Any]] = []
    o = UsageObserver(noted.append, sse=False)
    o.feed(b'{"usage": {"input_tokens": 1}}')
    o.feed(b"")
    o.close()
    assert noted == [] and o.copy is None
