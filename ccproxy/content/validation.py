"""Request validation: limits on model request bodies, blocked patterns, control characters.

One walker (`model_texts`) visits every text a model would read, in both APIs' request shapes:

- Anthropic Messages: `system`; each message's `content` (a string or blocks); in blocks, `text`
  (and its citations' `cited_text`), `thinking`, `tool_use`/`server_tool_use` `input` (every string),
  `tool_result` content (strings or nested blocks, any depth), `document` (`title`, `context`, a
  `text` source's `data`, a `base64` source of a text media type decoded, a `content` source's
  blocks), `search_result` (`title`, `source`, its `content` blocks); `tools[]` (every string:
  name, description, input schema). Blocks of a type not named here: every string but ids, types
  and signatures. Message Batches: each `requests[].params` as a Messages body.
- OpenAI Chat Completions: each message's `content` (string or parts: `text`, `file`
  `file_data` of a text media type decoded, `filename`), `refusal`, `name`, `tool_calls[]`
  `function.name`/`arguments`, `function_call`; `tools[]` / `functions[]` (every string).
- Responses: `instructions`, `input` (string or items: every string but ids and types),
  `tools[]`. Legacy completions (both APIs): `prompt` (and `suffix`).

Patterns are matched against each text NFKC-normalised, with format characters (zero-width,
soft hyphen, bidi controls) and control characters removed, and common Cyrillic/Greek look-alikes
read as their Latin letters. What is forwarded is what the client sent, except that with
`strip_control_characters` C0/C1 controls (not tab, newline) are removed from the texts above.
Refusals name the limit, never the text that hit it.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import unicodedata
from collections.abc import Iterator
from typing import Any

import attrs

from ccproxy.config.content import RequestValidation
from ccproxy.content import _json
from ccproxy.content.masking import compile_re2
from ccproxy.errors import ApiError

# C0 controls except tab and newline, DEL and C1 controls.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# Format characters (Unicode category Cf, as of Unicode 15) and controls but tab and newline: they
# render as nothing, so a pattern must not be dodged by them. One regex, not a per-character loop.
_INVISIBLE = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u180e"
    "\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb\U000110bd\U000110cd"
    "\U00013430-\U0001343f\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f]"
)
# Keys whose strings are identifiers or opaque data, not text a model reads as language.
_OPAQUE = frozenset({"type", "id", "tool_use_id", "call_id", "signature", "media_type", "cache_control",
                     "encrypted_content", "status", "role", "file_id", "image_url", "detail"})
_TEXT_MEDIA = re.compile(r"^text/|^application/(json|xml|x-yaml|yaml|csv)$")
# Look-alike letters of other scripts that NFKC leaves alone, read as the Latin letters they mimic.
_CONFUSABLES = str.maketrans(
    "аАвВеЕһНіІјЈкКмМоОрРсСтТуУхХԁԛԝѕЅɡΑΒΕΗΙΚΜΝΟΡΤΥΧΖαοιρνυκτχ",
    "aABBeEhHiIjJkKmMoOpPcCtTyYxXdqwsSgABEHIKMNOPTYXZaoipvyktx",
)
# The largest integer a JSON number may hold: beyond it, readers disagree (doubles round it).
_MAX_INT = 2**53


@attrs.define
class Refusal(Exception):
    """A request broke rule `rule`; `message` is safe to show the client."""

    rule: str
    message: str
    limit: int | None = None

    def api_error(self) -> ApiError:
        return ApiError(400, self.message, type="invalid_request_error")


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) != len(pairs):
        raise Refusal("json", "request body has a duplicate key in a JSON object")
    return value


def _constant(name: str) -> Any:
    raise Refusal("json", f"request body has a non-finite number ({name})")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise Refusal("json", "request body has a number out of range")
    return value


def _int(text: str) -> int:
    value = int(text)
    if abs(value) > _MAX_INT:
        raise Refusal("json", "request body has a number out of range")
    return value


_REQUEST_DECODER = json.JSONDecoder(object_pairs_hook=_pairs, parse_constant=_constant, parse_float=_float,
                                    parse_int=_int)


def strict_request(body: bytes) -> Any:
    """The body as JSON, refusing what two readers could read differently: duplicate keys,
    NaN/Infinity, numbers a double cannot hold."""
    try:
        return _json.loads(_REQUEST_DECODER, body)
    except Refusal:
        raise
    except RecursionError:
        raise Refusal("json", "request body nests JSON too deeply") from None
    except (ValueError, UnicodeDecodeError):
        raise Refusal("json", "request body is not valid JSON") from None


def normalise(text: str) -> str:
    """The text patterns are matched against: NFKC, no format or control characters, look-alikes folded."""
    if text.isascii():
        return _CONTROL.sub("", text)
    text = unicodedata.normalize("NFKC", text)
    return _INVISIBLE.sub("", text).translate(_CONFUSABLES)


class Validator:
    def __init__(self, config: RequestValidation) -> None:
        self.config = config
        self.blocked = tuple(compile_re2(p) for p in config.blocked_patterns)

    @staticmethod
    def parse(body: bytes) -> Any:
        return strict_request(body)

    def check(self, body: Any, kind: str, api: str = "anthropic") -> bool:
        """Raise Refusal if `body` breaks a limit; returns whether control characters were removed."""
        if not isinstance(body, dict):
            raise Refusal("json", "request body must be a JSON object")
        if kind == "batches":
            requests = body.get("requests")
            if not isinstance(requests, list):
                raise Refusal("json", "requests must be a list")
            changed = False
            for item in requests:
                params = item.get("params") if isinstance(item, dict) else None
                if not isinstance(params, dict):
                    raise Refusal("json", "each batch request must have params, a JSON object")
                changed = self.check(params, "messages", api) or changed
            return changed
        changed = False
        strip = self.config.strip_control_characters
        # One walk for both: cleaning replaces strings, never the places that hold them. The texts
        # are checked after the token and message limits all the same, so a body breaking several
        # rules is refused for the same one.
        texts = []
        for holder, key in model_texts(body, kind, api):
            value = holder[key]
            if strip:
                cleaned = _CONTROL.sub("", value)
                if cleaned != value:
                    holder[key] = value = cleaned
                    changed = True
            texts.append(value)
        self._tokens(body, kind)
        self._messages(body)
        for text in texts:
            self._text(text)
        for text in _decoded_texts(body, kind, api):
            self._text(text)
        return changed

    def _tokens(self, body: dict[str, Any], kind: str) -> None:
        limit = self.config.max_tokens
        keys = ("max_tokens", "max_completion_tokens", "max_output_tokens", "max_tokens_to_sample")
        for key in keys:
            value = body.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise Refusal("max_tokens", f"{key} must be a positive integer")
            if limit is not None and value > limit:
                raise Refusal("max_tokens", f"{key} exceeds the limit of {limit}", limit)

    def _messages(self, body: dict[str, Any]) -> None:
        messages = body.get("messages")
        if messages is None:
            return
        if not isinstance(messages, list):
            raise Refusal("messages", "messages must be a list")
        limit = self.config.max_messages
        if limit is not None and len(messages) > limit:
            raise Refusal("max_messages", f"{len(messages)} messages exceed the limit of {limit}", limit)

    def _text(self, text: str) -> None:
        limit = self.config.max_message_length
        if limit is not None and len(text) > limit:
            raise Refusal(
                "max_message_length", f"a message text of {len(text)} characters exceeds the limit of {limit}", limit
            )
        if not self.blocked:
            return
        seen = normalise(text)
        for i, pattern in enumerate(self.blocked):
            if pattern.search(seen) is not None or (seen is not text and pattern.search(text) is not None):
                rule = f"blocked_patterns[{i}]"
                raise Refusal(rule, f"request blocked by content rule {rule}")


Slot = tuple[Any, Any]  # (container, key): container[key] is a model-readable string


def _strings(value: Any, skip: frozenset[str] = _OPAQUE) -> Iterator[Slot]:
    """Every string inside a JSON value, but those under opaque keys; an explicit stack, any depth."""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, item in node.items():
                if isinstance(item, str):
                    if key not in skip:
                        yield node, key
                elif isinstance(item, dict | list):
                    stack.append(item)
        elif isinstance(node, list):
            for i, item in enumerate(node):
                if isinstance(item, str):
                    yield node, i
                elif isinstance(item, dict | list):
                    stack.append(item)


def _field(holder: Any, key: str) -> Iterator[Slot]:
    if isinstance(holder, dict) and isinstance(holder.get(key), str):
        yield holder, key


def _content(holder: Any, key: str) -> Iterator[Slot]:
    """A `content` that is a string or a list of blocks (blocks may nest: tool results)."""
    if not isinstance(holder, dict):
        return
    value = holder.get(key)
    if isinstance(value, str):
        yield holder, key
    elif isinstance(value, list):
        for i, block in enumerate(value):
            if isinstance(block, str):
                yield value, i
            else:
                yield from _block(block)


_KNOWN_SKIPPED = frozenset({"image", "redacted_thinking", "input_image", "image_url", "input_audio"})


def _block(block: Any) -> Iterator[Slot]:
    if not isinstance(block, dict):
        return
    kind = block.get("type")
    if kind in _KNOWN_SKIPPED:
        return
    if kind in ("text", "input_text", "output_text"):
        yield from _field(block, "text")
        citations = block.get("citations")
        for citation in citations if isinstance(citations, list) else []:
            yield from _field(citation, "cited_text")
    elif kind == "thinking":
        yield from _field(block, "thinking")
    elif kind in ("tool_use", "server_tool_use", "mcp_tool_use"):
        yield from _field(block, "name")
        yield from _strings(block.get("input"), frozenset())
    elif kind in ("tool_result", "mcp_tool_result", "search_result"):
        yield from _content(block, "content")
        yield from _field(block, "title")
        yield from _field(block, "source")
    elif kind == "document":
        yield from _field(block, "title")
        yield from _field(block, "context")
        source = block.get("source")
        if isinstance(source, dict):
            if source.get("type") == "text":
                yield from _field(source, "data")
            elif source.get("type") == "content":
                yield from _content(source, "content")
    elif kind in ("file", "input_file"):
        holder = block.get("file") if kind == "file" else block
        yield from _field(holder, "filename")
    elif kind == "refusal":
        yield from _field(block, "refusal")
    else:
        # A block type this walker does not know: every string but ids, types and signatures.
        yield from _strings(block)


def _chat_message(message: Any) -> Iterator[Slot]:
    if not isinstance(message, dict):
        return
    yield from _content(message, "content")
    yield from _field(message, "refusal")
    yield from _field(message, "name")
    calls = message.get("tool_calls")
    for call in calls if isinstance(calls, list) else []:
        function = call.get("function") if isinstance(call, dict) else None
        yield from _field(function, "name")
        yield from _field(function, "arguments")
    legacy = message.get("function_call")
    yield from _field(legacy, "name")
    yield from _field(legacy, "arguments")


def model_texts(body: dict[str, Any], kind: str, api: str) -> list[Slot]:
    """Every model-readable string of a request body, as (container, key) slots."""
    found: list[Slot] = []
    if kind in ("messages", "count_tokens"):
        found.extend(_content(body, "system"))
        messages = body.get("messages")
        for message in messages if isinstance(messages, list) else []:
            found.extend(_content(message, "content"))
        found.extend(_strings(body.get("tools"), frozenset({"type"})))
    elif kind == "chat_completions":
        messages = body.get("messages")
        for message in messages if isinstance(messages, list) else []:
            found.extend(_chat_message(message))
        found.extend(_strings(body.get("tools"), frozenset({"type"})))
        found.extend(_strings(body.get("functions"), frozenset({"type"})))
    elif kind == "responses":
        found.extend(_field(body, "instructions"))
        found.extend(_field(body, "input"))
        if isinstance(body.get("input"), list):
            found.extend(_strings(body["input"]))
        found.extend(_strings(body.get("tools"), frozenset({"type"})))
    elif kind in ("complete", "completions"):
        for key in ("prompt", "suffix"):
            value = body.get(key)
            if isinstance(value, str):
                found.append((body, key))
            elif isinstance(value, list):
                found.extend(_strings(value))
    return found


def _decoded_texts(body: dict[str, Any], kind: str, api: str) -> Iterator[str]:
    """Texts a model reads that arrive encoded: base64 documents and files of a text media type."""
    blocks: list[Any] = []
    if kind in ("messages", "count_tokens", "chat_completions", "responses"):
        stack: list[Any] = [body.get("messages"), body.get("input")]
        while stack:
            node = stack.pop()
            if isinstance(node, list):
                stack.extend(node)
            elif isinstance(node, dict):
                if node.get("type") in ("document", "file", "input_file"):
                    blocks.append(node)
                stack.extend(v for v in node.values() if isinstance(v, list | dict))
    for block in blocks:
        source = block.get("source") if block.get("type") == "document" else block.get("file", block)
        if not isinstance(source, dict):
            continue
        if block.get("type") == "document":
            if source.get("type") != "base64" or not _TEXT_MEDIA.match(str(source.get("media_type", ""))):
                continue
            data = source.get("data")
        else:
            url = source.get("file_data")
            if not isinstance(url, str) or not url.startswith("data:"):
                continue
            head, _, data = url.partition(",")
            if ";base64" not in head or not _TEXT_MEDIA.match(head[5:].split(";")[0]):
                continue
        if isinstance(data, str):
            text = _b64_text(data)
            if text is not None:
                yield text


def _b64_text(data: str) -> str | None:
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise Refusal("json", "a base64 document is not valid base64") from None
    return raw.decode("utf-8", errors="replace")



