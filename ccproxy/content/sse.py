"""Masking Server-Sent Event streams of model replies, event by event.

The byte stream is cut into whole events (an event is never split or sent half). Lines may end in
CR, LF or CRLF (all valid SSE); what goes out is framed with LF alone. An event is recognised by
the `type` in its data, with or without an `event:` line.

Each streamed part (Anthropic `text_delta`, `thinking_delta`, `input_json_delta`; OpenAI
`delta.content`, `delta.refusal`, `tool_calls[].function.arguments`; Responses `*.delta`) has its own
StreamMasker when its kind is masked (`Parts`): a delta carries what is final at once, with the tail
that could still grow into a secret held back. The held tail is flushed when the part ends: for
Anthropic in one extra `content_block_delta` just before `content_block_stop`; for Chat Completions
inside the chunk that carries the choice's `finish_reason` (or in one extra chunk before
`data: [DONE]`); for Responses in one extra delta event before the part's `.done` event. Every other
event passes byte for byte; event order, types and indexes are unchanged.

An event whose data is not JSON is masked as plain text; one with duplicate keys or NaN/Infinity
cannot be masked faithfully and cuts the stream (UnsafeReply).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from ccproxy.content.masking import JsonStringMasker, StreamMasker
from ccproxy.content.parts import TEXT, THINKING, TOOL_INPUTS
from ccproxy.content.replies import (
    PartMasker,
    UnsafeReply,
    dumps,
    mask_any,
    mask_arguments,
    mask_block,
    mask_citation,
    mask_message,
    mask_response_item,
    mask_responses,
    strict_loads,
)

EventHook = Callable[[dict[str, Any]], None]
AnyMasker = StreamMasker | JsonStringMasker


# The largest SSE event ccproxy holds while waiting for its end; a longer one is refused (the stream
# is cut) rather than buffered without bound.
MAX_EVENT = 16 * 1024 * 1024


class EventTooLarge(ValueError):
    pass


class EventSplitter:
    """Cuts bytes into whole SSE events (each ending with a blank line), line endings made LF."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        # Where to look for a terminator again: an event arriving in many reads is scanned once.
        self.scanned = 0
        self.cr_pending = False  # the last piece ended in CR: a LF starting the next belongs to it

    def feed(self, data: bytes) -> list[bytes]:
        if self.cr_pending and data.startswith(b"\n"):
            data = data[1:]
        if b"\r" in data:
            self.cr_pending = data.endswith(b"\r")
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        elif data:
            self.cr_pending = False
        buffer = self.buffer
        buffer += data
        events: list[bytes] = []
        start = 0
        while True:
            i = buffer.find(b"\n\n", max(start, self.scanned))
            if i < 0:
                break
            events.append(bytes(buffer[start : i + 2]))
            start = i + 2
        if start:
            del buffer[:start]
        self.scanned = max(0, len(buffer) - 1)
        if len(buffer) > MAX_EVENT:
            raise EventTooLarge(f"an SSE event larger than {MAX_EVENT} bytes")
        return events

    def rest(self) -> bytes:
        rest = bytes(self.buffer)
        self.buffer.clear()
        self.scanned = 0
        return rest


def parse_event(raw: bytes) -> tuple[bytes | None, bytes | None]:
    """The event name and the data of one raw event (None when absent)."""
    name: bytes | None = None
    data: list[bytes] = []
    for line in raw.splitlines():
        field, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if field == b"event":
            name = value
        elif field == b"data":
            data.append(value)
    return name, (b"\n".join(data) if data else None)


def _render(name: bytes | None, event: Any) -> bytes:
    head = b"event: " + name + b"\n" if name else b""
    return head + b"data: " + dumps(event) + b"\n\n"


class _Stream:
    """What the three stream kinds share: parsing, the fallback for data that is not JSON."""

    def __init__(self, pm: PartMasker, on_event: EventHook | None = None) -> None:
        self.pm = pm
        self.on_event = on_event

    def _parse(self, raw: bytes) -> tuple[bytes | None, Any, bytes | None]:
        """(name, parsed data or None, bytes to send instead when the data is not JSON)."""
        name, data = parse_event(raw)
        if data is None:
            return name, None, raw
        try:
            return name, strict_loads(data), None
        except UnsafeReply:
            raise
        except (ValueError, RecursionError):
            # Not JSON: it may still be shown to someone. Mask it as text.
            if not self.pm.masks(TEXT):
                return name, None, raw
            before = self.pm.counts.total()
            out = self.pm.whole.mask_bytes(raw, self.pm.counts)
            if self.pm.counts.total() != before:
                self.pm.altered.add(TEXT)
            return name, None, out

    def event(self, raw: bytes) -> bytes:
        raise NotImplementedError

    def close(self) -> bytes:
        return b""


_DELTAS: dict[str, tuple[str, str, bool]] = {
    # delta type -> (field, kind, is JSON text)
    "text_delta": ("text", TEXT, False),
    "thinking_delta": ("thinking", THINKING, False),
    "input_json_delta": ("partial_json", TOOL_INPUTS, True),
}
# Events that are passed without parsing when their data names none of these (and has no escape
# that could spell one).
_ANTHROPIC_MARKS = (b'"content_block_', b'"message_start"', b'"message_delta"', b'"message_stop"', b'"error"')


class AnthropicStream(_Stream):
    """Masks a Messages stream part by part."""

    def __init__(self, pm: PartMasker, on_event: EventHook | None = None) -> None:
        super().__init__(pm, on_event)
        # index -> delta type -> masker (None: that part passes unmasked)
        self.blocks: dict[int, dict[str, AnyMasker | None]] = {}
        self.named = True

    def _masker(self, index: int, delta_type: str) -> AnyMasker | None:
        block = self.blocks.setdefault(index, {})
        if delta_type not in block:
            _, kind, is_json = _DELTAS[delta_type]
            if kind == TEXT:
                kind = self.pm.text_kind
            block[delta_type] = self.pm.json_stream(kind) if is_json else self.pm.stream(kind)
        return block[delta_type]

    def event(self, raw: bytes) -> bytes:
        if b"\\u" not in raw and not any(mark in raw for mark in _ANTHROPIC_MARKS):
            return raw
        name, event, instead = self._parse(raw)
        if event is None:
            return instead if instead is not None else raw
        if not isinstance(event, dict):
            return raw
        self.named = name is not None
        if self.on_event is not None:
            self.on_event(event)
        kind = event.get("type")
        index = event.get("index")
        if kind == "content_block_delta" and isinstance(index, int):
            return self._delta(raw, name, event, index)
        if kind == "content_block_start" and isinstance(index, int):
            return self._start(raw, name, event, index)
        if kind == "content_block_stop" and isinstance(index, int):
            return self._flush(index) + raw
        if kind == "message_start" and isinstance(event.get("message"), dict):
            return self._whole(raw, name, event, lambda: mask_message(event["message"], self.pm))
        if kind == "error":
            return self._whole(raw, name, event, lambda: event.__setitem__(
                "error", self.pm.strings(TEXT, event.get("error"))))
        if kind == "message_stop":
            return self.close() + raw
        return raw

    def _whole(self, raw: bytes, name: bytes | None, event: dict[str, Any], fn: Callable[[], None]) -> bytes:
        before = self.pm.counts.total()
        fn()
        return raw if self.pm.counts.total() == before else _render(name, event)

    def _start(self, raw: bytes, name: bytes | None, event: dict[str, Any], index: int) -> bytes:
        block = event.get("content_block")
        if not isinstance(block, dict):
            return raw
        changed = False
        initial = {"text": "text_delta", "thinking": "thinking_delta"}.get(str(block.get("type")))
        if initial is not None:
            field = _DELTAS[initial][0]
            masker = self._masker(index, initial)
            text = block.get(field)
            if masker is not None and isinstance(text, str) and text:
                out = masker.feed(text)
                changed = out != text
                block[field] = out
        before = self.pm.counts.total()
        if block.get("type") != "text" and block.get("type") != "thinking":
            mask_block(block, self.pm)  # a tool call's initial input
        elif block.get("citations"):
            for citation in block["citations"]:
                mask_citation(citation, self.pm)
        changed = changed or self.pm.counts.total() != before
        return _render(name, event) if changed else raw

    def _delta(self, raw: bytes, name: bytes | None, event: dict[str, Any], index: int) -> bytes:
        delta = event.get("delta")
        if not isinstance(delta, dict):
            return raw
        delta_type = delta.get("type")
        if delta_type == "citations_delta":
            return self._whole(raw, name, event, lambda: mask_citation(delta.get("citation"), self.pm))
        if delta_type not in _DELTAS:
            return raw
        field = _DELTAS[delta_type][0]
        masker = self._masker(index, delta_type)
        piece = delta.get(field)
        if masker is None or not isinstance(piece, str):
            return raw
        out = masker.feed(piece)
        if out == piece:
            return raw
        delta[field] = out
        return _render(name, event)

    def _flush(self, index: int) -> bytes:
        out = b""
        for delta_type, masker in self.blocks.pop(index, {}).items():
            tail = masker.close() if masker is not None else ""
            if tail:
                name = b"content_block_delta" if self.named else None
                out += _render(name, {"type": "content_block_delta", "index": index,
                                      "delta": {"type": delta_type, _DELTAS[delta_type][0]: tail}})
        return out

    def close(self) -> bytes:
        return b"".join(self._flush(index) for index in sorted(self.blocks))


class OpenAIStream(_Stream):
    """Masks a Chat Completions (or legacy Completions) stream part by part."""

    def __init__(self, pm: PartMasker, on_event: EventHook | None = None) -> None:
        super().__init__(pm, on_event)
        # (choice index, part) -> masker; part: "content", "refusal", "text" or a tool call's index
        self.parts: dict[tuple[int, str | int], AnyMasker | None] = {}
        self.last: dict[str, Any] = {}

    def _masker(self, key: tuple[int, str | int]) -> AnyMasker | None:
        if key not in self.parts:
            part = key[1]
            if isinstance(part, int):
                self.parts[key] = self.pm.json_stream(TOOL_INPUTS)
            else:
                self.parts[key] = self.pm.stream(TEXT if part == "refusal" else self.pm.text_kind)
        return self.parts[key]

    def event(self, raw: bytes) -> bytes:
        _, data = parse_event(raw)
        if data is not None and data.strip() == b"[DONE]":
            return self.close() + raw
        _, chunk, instead = self._parse(raw)
        if chunk is None:
            return instead if instead is not None else raw
        if not isinstance(chunk, dict):
            return raw
        if self.on_event is not None:
            self.on_event(chunk)
        before = self.pm.counts.total()
        changed = False
        if "error" in chunk:
            chunk["error"] = self.pm.strings(TEXT, chunk["error"])
        choices = chunk.get("choices")
        if isinstance(choices, list):
            self.last = {k: chunk[k] for k in ("id", "object", "created", "model") if k in chunk}
            for choice in choices:
                if isinstance(choice, dict) and isinstance(choice.get("index", 0), int):
                    changed = self._choice(choice) or changed
        changed = changed or self.pm.counts.total() != before
        return b"data: " + dumps(chunk) + b"\n\n" if changed else raw

    def _feed(self, holder: dict[str, Any], field: str, key: tuple[int, str | int]) -> bool:
        piece = holder.get(field)
        if not isinstance(piece, str):
            return False
        masker = self._masker(key)
        if masker is None:
            return False
        out = masker.feed(piece)
        holder[field] = out
        return out != piece

    def _choice(self, choice: dict[str, Any]) -> bool:
        index = choice.get("index", 0)
        changed = self._feed(choice, "text", (index, "text"))
        delta = choice.get("delta")
        if isinstance(delta, dict):
            changed = self._feed(delta, "content", (index, "content")) or changed
            changed = self._feed(delta, "refusal", (index, "refusal")) or changed
            calls = delta.get("tool_calls")
            for call in calls if isinstance(calls, list) else []:
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict) and isinstance(call.get("index", 0), int):
                    changed = self._feed(function, "arguments", (index, call.get("index", 0))) or changed
        if choice.get("finish_reason") is not None:
            changed = self._flush_into(index, choice) or changed
        return changed

    def _tails(self, index: int) -> dict[str | int, str]:
        tails: dict[str | int, str] = {}
        for key in [k for k in self.parts if k[0] == index]:
            masker = self.parts.pop(key)
            tail = masker.close() if masker is not None else ""
            if tail:
                tails[key[1]] = tail
        return tails

    def _flush_into(self, index: int, choice: dict[str, Any]) -> bool:
        tails = self._tails(index)
        if not tails:
            return False
        if "text" in tails:
            choice["text"] = (choice.get("text") or "") + tails.pop("text")
        if tails:
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                delta = choice["delta"] = {}
            for part, tail in tails.items():
                if isinstance(part, int):
                    calls = delta.setdefault("tool_calls", [])
                    calls.append({"index": part, "function": {"arguments": tail}})
                else:
                    delta[part] = (delta.get(part) or "") + tail
        return True

    def close(self) -> bytes:
        out = b""
        for index in sorted({k[0] for k in self.parts}):
            choice: dict[str, Any] = {"index": index, "delta": {}, "finish_reason": None}
            if self._flush_into(index, choice):
                if not choice["delta"]:
                    del choice["delta"]
                out += b"data: " + dumps({**self.last, "choices": [choice]}) + b"\n\n"
        return out


_RESPONSES_DELTAS: dict[str, tuple[str, bool, str]] = {
    # event type -> (kind, is JSON text, the `.done` event that ends it)
    "response.output_text.delta": (TEXT, False, "response.output_text.done"),
    "response.refusal.delta": (TEXT, False, "response.refusal.done"),
    "response.reasoning_summary_text.delta": (THINKING, False, "response.reasoning_summary_text.done"),
    "response.reasoning_text.delta": (THINKING, False, "response.reasoning_text.done"),
    "response.function_call_arguments.delta": (TOOL_INPUTS, True, "response.function_call_arguments.done"),
}
_RESPONSES_DONE = {done: delta for delta, (_, _, done) in _RESPONSES_DELTAS.items()}


class ResponsesStream(_Stream):
    """Masks a Responses API stream: deltas streamed, whole texts in `.done` and final events."""

    def __init__(self, pm: PartMasker, on_event: EventHook | None = None) -> None:
        super().__init__(pm, on_event)
        self.parts: dict[tuple[Any, ...], tuple[AnyMasker | None, dict[str, Any], bytes | None]] = {}

    @staticmethod
    def _key(event: dict[str, Any]) -> tuple[Any, ...]:
        return (event.get("item_id"), event.get("output_index"), event.get("content_index"),
                event.get("summary_index"))

    def event(self, raw: bytes) -> bytes:
        name, event, instead = self._parse(raw)
        if event is None:
            return instead if instead is not None else raw
        if not isinstance(event, dict):
            return raw
        if self.on_event is not None:
            self.on_event(event)
        kind = str(event.get("type"))
        if kind in _RESPONSES_DELTAS:
            return self._delta(raw, name, event, kind)
        before = self.pm.counts.total()
        prefix = b""
        if kind in _RESPONSES_DONE:
            prefix = self._flush(self._key(event), kind)
        text_kind = self.pm.text_kind if kind == "response.output_text.done" else TEXT
        if kind.startswith("response.reasoning"):
            text_kind = THINKING
        for field in ("text", "refusal"):
            if field in event:
                event[field] = self.pm.text(text_kind, event[field])
        if isinstance(event.get("arguments"), str):
            event["arguments"] = mask_arguments(event["arguments"], self.pm)
        if isinstance(event.get("response"), dict):
            mask_responses(event["response"], self.pm)
        if isinstance(event.get("item"), dict):
            mask_response_item(event["item"], self.pm)
        part = event.get("part")
        if isinstance(part, dict):
            for field in ("text", "refusal"):
                if field in part:
                    part[field] = self.pm.text(text_kind if field == "text" else TEXT, part[field])
        if kind == "error":
            mask_any(event, self.pm)
        changed = self.pm.counts.total() != before
        return prefix + (_render(name, event) if changed else raw)

    def _delta(self, raw: bytes, name: bytes | None, event: dict[str, Any], kind: str) -> bytes:
        key = self._key(event)
        if key not in self.parts:
            part_kind, is_json, _ = _RESPONSES_DELTAS[kind]
            if part_kind == TEXT and kind == "response.output_text.delta":
                part_kind = self.pm.text_kind
            masker = self.pm.json_stream(part_kind) if is_json else self.pm.stream(part_kind)
            self.parts[key] = (masker, event, name)
        masker = self.parts[key][0]
        piece = event.get("delta")
        if masker is None or not isinstance(piece, str):
            return raw
        out = masker.feed(piece)
        if out == piece:
            return raw
        event["delta"] = out
        return _render(name, event)

    def _flush(self, key: tuple[Any, ...], done: str) -> bytes:
        held = self.parts.pop(key, None)
        masker = held[0] if held is not None else None
        if held is None or masker is None:
            return b""
        _, first, name = held
        tail = masker.close()
        if not tail:
            return b""
        extra = {k: v for k, v in first.items() if k not in ("delta", "sequence_number", "obfuscation")}
        extra["delta"] = tail
        return _render(name, extra)

    def close(self) -> bytes:
        out = b""
        for key in list(self.parts):
            out += self._flush(key, "")
        return out


class GenericStream(_Stream):
    """A stream ccproxy does not know the shape of: every string of every event is masked as text."""

    def event(self, raw: bytes) -> bytes:
        name, event, instead = self._parse(raw)
        if event is None:
            return instead if instead is not None else raw
        if self.on_event is not None and isinstance(event, dict):
            self.on_event(event)
        before = self.pm.counts.total()
        mask_any(event, self.pm)
        return raw if self.pm.counts.total() == before else _render(name, event)


class UsageObserver:
    """A BodyFilter that changes nothing: it reads token usage from a reply masking leaves alone
    (masking switched off). SSE events are parsed only when they mention usage; a JSON body is
    copied (up to `MAX_OBSERVED` bytes) and parsed when it is whole."""

    transparent = True
    MAX_OBSERVED = 16 * 1024 * 1024

    def __init__(self, note: EventHook, sse: bool) -> None:
        self.note = note
        self.splitter = EventSplitter() if sse else None
        self.copy: list[bytes] | None = None if sse else []
        self.size = 0

    def feed(self, data: bytes) -> bytes:
        if self.splitter is not None:
            for raw in self.splitter.feed(data):
                self._event(raw)
        elif self.copy is not None:
            self.size += len(data)
            if self.size > self.MAX_OBSERVED:
                self.copy = None
            else:
                self.copy.append(data)
        return data

    def _event(self, raw: bytes) -> None:
        if b'"usage"' not in raw and b"\\u" not in raw:
            return
        _, data = parse_event(raw)
        try:
            value = strict_loads(data) if data is not None else None
        except (ValueError, RecursionError):
            return
        if isinstance(value, dict):
            self.note(value)

    def close(self) -> bytes:
        if self.splitter is not None:
            self._event(self.splitter.rest())
        elif self.copy:
            try:
                value = strict_loads(b"".join(self.copy))
            except (ValueError, RecursionError, UnicodeDecodeError):
                value = None
            if isinstance(value, dict):
                self.note(value)
        return b""


def signal_line(found: Counter[str]) -> bytes:
    """An SSE comment line (ignored by every SSE reader) naming what ccproxy replaced."""
    return b": ccproxy-masked " + ",".join(f"{rule}={n}" for rule, n in sorted(found.items())).encode() + b"\n"


class SseFilter:
    """A BodyFilter over an SSE stream; `on_close(counts)` reports what was masked.

    An event ccproxy altered is preceded, inside the same event, by a comment line
    `: ccproxy-masked RULE=N,...` with what was replaced in it.
    """

    def __init__(self, stream: _Stream, counts: Counter[str],
                 on_close: Callable[[Counter[str]], None], signal: bool = True) -> None:
        self.splitter = EventSplitter()
        self.stream = stream
        self.counts = counts
        self.on_close = on_close
        self.signal = signal
        self.reported: Counter[str] = Counter()  # the counts already signalled to the client

    def _signalled(self, out: bytes) -> bytes:
        if not self.signal or not out or self.counts.total() == self.reported.total():
            return out
        found = self.counts - self.reported
        self.reported = Counter(self.counts)
        return signal_line(found) + out

    def feed(self, data: bytes) -> bytes:
        return b"".join(self._signalled(self.stream.event(raw)) for raw in self.splitter.feed(data))

    def close(self) -> bytes:
        rest = self.splitter.rest()
        out = self.stream.event(rest) if rest.strip() else rest
        tail = self.stream.close()
        out = tail + out if isinstance(self.stream, AnthropicStream) else out + tail
        self.on_close(self.counts)
        return self._signalled(out)
