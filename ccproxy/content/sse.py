"""Masking Server-Sent Event streams of model text, event by event.

The byte stream is cut into whole events (an event is never split or sent half). Each text-bearing
content block (Anthropic `text_delta` / `input_json_delta`; OpenAI `choices[i].delta.content`) has
its own StreamMasker: a delta event carries what is final at once, with the tail that could still
grow into a secret held back. The held tail is flushed when the block ends: for Anthropic in one
extra `content_block_delta` just before `content_block_stop`; for OpenAI inside the chunk that
carries the choice's `finish_reason` (or in one extra chunk before `data: [DONE]`). Every other event
passes byte for byte; event order, types and indexes are unchanged.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from typing import Any

from ccproxy.content.masking import JsonStringMasker, StreamMasker

_ANTHROPIC_TEXT_EVENTS = (b"content_block_start", b"content_block_delta", b"content_block_stop")


class EventSplitter:
    """Cuts bytes into whole SSE events (each with its blank-line terminator)."""

    def __init__(self) -> None:
        self.buffer = b""
        # Where to look for a terminator again: an event arriving in many reads is scanned once.
        self.scanned = 0

    def feed(self, data: bytes) -> list[bytes]:
        self.buffer += data
        events: list[bytes] = []
        while True:
            cut = _terminator_end(self.buffer, self.scanned)
            if cut < 0:
                self.scanned = max(0, len(self.buffer) - 3)
                return events
            events.append(self.buffer[:cut])
            self.buffer = self.buffer[cut:]
            self.scanned = 0

    def rest(self) -> bytes:
        rest, self.buffer, self.scanned = self.buffer, b"", 0
        return rest


def _terminator_end(buffer: bytes, start: int) -> int:
    ends = [i + len(t) for t in (b"\n\n", b"\r\n\r\n") if (i := buffer.find(t, start)) >= 0]
    return min(ends) if ends else -1


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


def _dump(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


MaskerFactory = Callable[[], StreamMasker]


class AnthropicStream:
    """Masks the text and tool-input deltas of a Messages stream."""

    def __init__(self, new_masker: MaskerFactory) -> None:
        self.new_masker = new_masker
        # index -> (masker, delta type, delta field)
        self.blocks: dict[int, tuple[StreamMasker | JsonStringMasker, str, str]] = {}

    def event(self, raw: bytes) -> bytes:
        if not any(name in raw for name in _ANTHROPIC_TEXT_EVENTS):
            return raw
        name, data = parse_event(raw)
        if name not in _ANTHROPIC_TEXT_EVENTS or data is None:
            return raw
        try:
            event = json.loads(data)
        except ValueError:
            return raw
        if not isinstance(event, dict) or not isinstance(event.get("index"), int):
            return raw
        kind = event.get("type")
        if kind == "content_block_start":
            return self._start(raw, event)
        if kind == "content_block_delta":
            return self._delta(raw, event)
        if kind == "content_block_stop":
            return self._flush(event["index"]) + raw
        return raw

    def _start(self, raw: bytes, event: dict[str, Any]) -> bytes:
        block = event.get("content_block")
        index = event["index"]
        if not isinstance(block, dict):
            return raw
        if block.get("type") == "text":
            self.blocks[index] = (self.new_masker(), "text_delta", "text")
            text = block.get("text")
            if isinstance(text, str) and text:
                block["text"] = self.blocks[index][0].feed(text)
                return self._render(event)
        elif block.get("type") in ("tool_use", "server_tool_use"):
            self.blocks[index] = (JsonStringMasker(self.new_masker), "input_json_delta", "partial_json")
        return raw

    def _delta(self, raw: bytes, event: dict[str, Any]) -> bytes:
        delta = event.get("delta")
        if not isinstance(delta, dict):
            return raw
        held = self.blocks.get(event["index"])
        if held is None:
            # No content_block_start came for this block: its text is masked all the same.
            if delta.get("type") == "text_delta":
                held = self.blocks[event["index"]] = (self.new_masker(), "text_delta", "text")
            elif delta.get("type") == "input_json_delta":
                held = (JsonStringMasker(self.new_masker), "input_json_delta", "partial_json")
                self.blocks[event["index"]] = held
            else:
                return raw
        masker, delta_type, field = held
        piece = delta.get(field)
        if delta.get("type") != delta_type or not isinstance(piece, str):
            return raw
        out = masker.feed(piece)
        if out == piece:
            return raw
        delta[field] = out
        return self._render(event)

    def _flush(self, index: int) -> bytes:
        held = self.blocks.pop(index, None)
        if held is None:
            return b""
        masker, delta_type, field = held
        tail = masker.close()
        if not tail:
            return b""
        return self._render({"type": "content_block_delta", "index": index,
                             "delta": {"type": delta_type, field: tail}})

    def close(self) -> bytes:
        return b"".join(self._flush(index) for index in sorted(self.blocks))

    @staticmethod
    def _render(event: dict[str, Any]) -> bytes:
        return b"event: " + event["type"].encode() + b"\ndata: " + _dump(event) + b"\n\n"


class OpenAIStream:
    """Masks `choices[i].delta.content` of a Chat Completions stream."""

    def __init__(self, new_masker: MaskerFactory) -> None:
        self.new_masker = new_masker
        self.choices: dict[int, StreamMasker] = {}
        self.last: dict[str, Any] = {}

    def event(self, raw: bytes) -> bytes:
        _, data = parse_event(raw)
        if data is None:
            return raw
        if data.strip() == b"[DONE]":
            return self.close() + raw
        try:
            chunk = json.loads(data)
        except ValueError:
            return raw
        if not isinstance(chunk, dict) or not isinstance(chunk.get("choices"), list):
            return raw
        self.last = {k: chunk[k] for k in ("id", "object", "created", "model") if k in chunk}
        changed = False
        for choice in chunk["choices"]:
            if isinstance(choice, dict) and isinstance(choice.get("index", 0), int):
                changed = self._choice(choice) or changed
        return b"data: " + _dump(chunk) + b"\n\n" if changed else raw

    def _choice(self, choice: dict[str, Any]) -> bool:
        index = choice.get("index", 0)
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            return False
        piece = delta.get("content")
        out = piece
        if isinstance(piece, str):
            masker = self.choices.get(index)
            if masker is None:
                masker = self.choices[index] = self.new_masker()
            out = masker.feed(piece)
        if choice.get("finish_reason") is not None and index in self.choices:
            tail = self.choices.pop(index).close()
            if tail:
                out = (out or "") + tail
        if out == piece:
            return False
        delta["content"] = out
        return True

    def close(self) -> bytes:
        out = b""
        for index in sorted(self.choices):
            tail = self.choices.pop(index).close()
            if tail:
                chunk = {**self.last, "choices": [{"index": index, "delta": {"content": tail}, "finish_reason": None}]}
                out += b"data: " + _dump(chunk) + b"\n\n"
        return out


class SseFilter:
    """A BodyFilter over an SSE stream; `on_close(counts)` reports what was masked."""

    def __init__(self, stream: AnthropicStream | OpenAIStream, counts: Counter[str],
                 on_close: Callable[[Counter[str]], None]) -> None:
        self.splitter = EventSplitter()
        self.stream = stream
        self.counts = counts
        self.on_close = on_close

    def feed(self, data: bytes) -> bytes:
        return b"".join(self.stream.event(raw) for raw in self.splitter.feed(data))

    def close(self) -> bytes:
        rest = self.splitter.rest()
        out = self.stream.event(rest) if rest.strip() else rest
        out = self.stream.close() + out if isinstance(self.stream, AnthropicStream) else out + self.stream.close()
        self.on_close(self.counts)
        return out
