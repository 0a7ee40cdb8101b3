"""Masking whole replies of the model APIs, part by part.

`PartMasker` is what every walker (whole JSON here, streams in `sse`) masks through: it knows which
kinds of parts are masked (`Parts`), counts what each rule replaced, and remembers which kinds of
parts it changed, for the `response_masked` event and the signal to the client.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from typing import Any

from ccproxy.content import _json
from ccproxy.content.masking import JsonStringMasker, Masker, StreamMasker, mask_strings
from ccproxy.content.parts import TEXT, THINKING, TOOL_INPUTS, Parts


class UnsafeReply(ValueError):
    """A reply that cannot be masked faithfully (duplicate keys, non-finite numbers)."""


class PartMasker:
    def __init__(self, new_masker: Callable[[], Masker], parts: Parts, structured: bool,
                 counts: Counter[str] | None = None) -> None:
        self.new_masker = new_masker
        self.parts = parts
        self.text_kind = parts.text_kind(structured)
        self.counts: Counter[str] = counts if counts is not None else Counter()
        self.altered: set[str] = set()
        self._whole: Masker | None = None

    def masks(self, kind: str) -> bool:
        return self.parts.masks(kind)

    @property
    def whole(self) -> Masker:
        if self._whole is None:
            self._whole = self.new_masker()
        return self._whole

    def text(self, kind: str, value: Any) -> Any:
        """`value` masked if it is a string and its kind is masked."""
        if not isinstance(value, str) or not self.parts.masks(kind):
            return value
        before = self.counts.total()
        out = self.whole.mask(value, self.counts)
        if self.counts.total() != before:
            self.altered.add(kind)
        return out

    def strings(self, kind: str, value: Any) -> Any:
        """Every string inside a JSON value, masked if its kind is (keys are left alone)."""
        if not self.parts.masks(kind):
            return value
        before = self.counts.total()
        out = mask_strings(value, self.whole, self.counts)
        if self.counts.total() != before:
            self.altered.add(kind)
        return out

    def stream(self, kind: str) -> StreamMasker | None:
        return _Tracked(self, kind) if self.parts.masks(kind) else None

    def json_stream(self, kind: str) -> JsonStringMasker | None:
        if not self.parts.masks(kind):
            return None
        return JsonStringMasker(lambda: _Tracked(self, kind))


class _Tracked(StreamMasker):
    """A StreamMasker that notes its kind as altered when it replaces something."""

    def __init__(self, owner: PartMasker, kind: str) -> None:
        super().__init__(owner.new_masker(), owner.counts)
        self.owner = owner
        self.kind = kind

    def feed(self, piece: str) -> str:
        before = self.counts.total()
        out = super().feed(piece)
        if self.counts.total() != before:
            self.owner.altered.add(self.kind)
        return out

    def close(self) -> str:
        before = self.counts.total()
        out = super().close()
        if self.counts.total() != before:
            self.owner.altered.add(self.kind)
        return out


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) != len(pairs):
        raise UnsafeReply("duplicate key in a JSON object")
    return value


def _constant(name: str) -> Any:
    raise UnsafeReply(f"non-finite number {name}")


_REPLY_DECODER = json.JSONDecoder(object_pairs_hook=_pairs, parse_constant=_constant)


def strict_loads(data: bytes | str) -> Any:
    """JSON as a client would read it, refusing what two readers could read differently:
    duplicate keys (one keeps the first, another the last) and NaN/Infinity."""
    return _json.loads(_REPLY_DECODER, data)


def dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


# --- Anthropic ---------------------------------------------------------------------------------

_TOOL_BLOCKS = frozenset({"tool_use", "server_tool_use", "mcp_tool_use"})


def mask_block(block: Any, pm: PartMasker) -> None:
    """One Messages content block, in place."""
    if not isinstance(block, dict):
        return
    kind = block.get("type")
    if kind == "text":
        block["text"] = pm.text(pm.text_kind, block.get("text"))
        citations = block.get("citations")
        if isinstance(citations, list):
            for citation in citations:
                mask_citation(citation, pm)
    elif kind == "thinking":
        block["thinking"] = pm.text(THINKING, block.get("thinking"))
    elif kind in _TOOL_BLOCKS and "input" in block:
        block["input"] = pm.strings(TOOL_INPUTS, block["input"])


def mask_citation(citation: Any, pm: PartMasker) -> None:
    if isinstance(citation, dict):
        for key in ("cited_text", "document_title", "title"):
            if key in citation:
                citation[key] = pm.text(TEXT, citation[key])


def mask_message(value: Any, pm: PartMasker) -> None:
    """A Messages reply (or an `error` reply, whose message a person reads)."""
    if not isinstance(value, dict):
        return
    if value.get("type") == "error" or "error" in value:
        value["error"] = pm.strings(TEXT, value.get("error"))
    content = value.get("content")
    for block in content if isinstance(content, list) else []:
        mask_block(block, pm)
    if isinstance(value.get("completion"), str):  # legacy Text Completions (/v1/complete)
        value["completion"] = pm.text(pm.text_kind, value["completion"])


# --- OpenAI ------------------------------------------------------------------------------------


def mask_arguments(arguments: Any, pm: PartMasker) -> Any:
    """A tool call's JSON-encoded arguments: strings masked; the text kept when nothing changed."""
    if not isinstance(arguments, str) or not pm.masks(TOOL_INPUTS):
        return arguments
    before = pm.counts.total()
    try:
        masked = pm.strings(TOOL_INPUTS, json.loads(arguments))
        return arguments if pm.counts.total() == before else json.dumps(masked, ensure_ascii=False)
    except (ValueError, RecursionError):
        return pm.text(TOOL_INPUTS, arguments)


def mask_chat_message(message: Any, pm: PartMasker) -> None:
    if not isinstance(message, dict):
        return
    content = message.get("content")
    if isinstance(content, str):
        message["content"] = pm.text(pm.text_kind, content)
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and "text" in part:
                part["text"] = pm.text(pm.text_kind, part["text"])
    if "refusal" in message:
        message["refusal"] = pm.text(TEXT, message["refusal"])
    calls = message.get("tool_calls")
    for call in calls if isinstance(calls, list) else []:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and "arguments" in function:
            function["arguments"] = mask_arguments(function["arguments"], pm)
    legacy = message.get("function_call")
    if isinstance(legacy, dict) and "arguments" in legacy:
        legacy["arguments"] = mask_arguments(legacy["arguments"], pm)


def mask_completion(value: Any, pm: PartMasker) -> None:
    """A Chat Completions (or legacy Completions) reply, or an error reply."""
    if not isinstance(value, dict):
        return
    if "error" in value:
        value["error"] = pm.strings(TEXT, value["error"])
    choices = value.get("choices")
    for choice in choices if isinstance(choices, list) else []:
        if not isinstance(choice, dict):
            continue
        mask_chat_message(choice.get("message"), pm)
        if "text" in choice:  # legacy Completions
            choice["text"] = pm.text(pm.text_kind, choice["text"])


def mask_response_item(item: Any, pm: PartMasker) -> None:
    """One `output` item of the Responses API."""
    if not isinstance(item, dict):
        return
    kind = item.get("type")
    if kind == "message":
        content = item.get("content")
        for part in content if isinstance(content, list) else []:
            if not isinstance(part, dict):
                continue
            if "text" in part:
                part["text"] = pm.text(pm.text_kind, part["text"])
            if "refusal" in part:
                part["refusal"] = pm.text(TEXT, part["refusal"])
    elif kind == "reasoning":
        for key in ("summary", "content"):
            parts = item.get(key)
            for part in parts if isinstance(parts, list) else []:
                if isinstance(part, dict) and "text" in part:
                    part["text"] = pm.text(THINKING, part["text"])
    elif kind in ("function_call", "custom_tool_call", "mcp_call"):
        for key in ("arguments", "input"):
            if key in item:
                item[key] = mask_arguments(item[key], pm) if key == "arguments" else pm.strings(TOOL_INPUTS, item[key])


def mask_responses(value: Any, pm: PartMasker) -> None:
    if not isinstance(value, dict):
        return
    if isinstance(value.get("error"), dict):
        value["error"] = pm.strings(TEXT, value["error"])
    output = value.get("output")
    for item in output if isinstance(output, list) else []:
        mask_response_item(item, pm)
    if isinstance(value.get("output_text"), str):
        value["output_text"] = pm.text(pm.text_kind, value["output_text"])


def mask_batch_line(value: Any, pm: PartMasker) -> None:
    """One line of a Message Batches results file: `result.message` is a Messages reply."""
    result = value.get("result") if isinstance(value, dict) else None
    if isinstance(result, dict):
        mask_message(result.get("message"), pm)
        if "error" in result:
            result["error"] = pm.strings(TEXT, result["error"])


def mask_any(value: Any, pm: PartMasker) -> None:
    """A reply whose shape ccproxy does not know: every string is text a person may read."""
    if isinstance(value, dict | list):
        pm.strings(TEXT, value)


Walker = Callable[[Any, PartMasker], None]
