"""Request validation: limits on Messages and Chat Completions bodies, blocked patterns, control characters.

Every text a model would read is visited: `system` (string or text blocks), each message's `content`
(string, or blocks: `text`, `tool_result` with string or nested text content) and OpenAI's message
shapes (content string or `text` parts). Control characters are removed first, so limits and patterns
apply to what is forwarded. Refusals name the limit, never the text that hit it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import attrs

from ccproxy.config.content import RequestValidation
from ccproxy.content.masking import compile_re2
from ccproxy.errors import ApiError

# C0 controls except tab (\x09) and newline (\x0a), as the seed's content filter.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f]")


@attrs.define
class Refusal(Exception):
    """A request broke rule `rule`; `message` is safe to show the client."""

    rule: str
    message: str
    limit: int | None = None

    def api_error(self) -> ApiError:
        return ApiError(400, self.message, type="invalid_request_error")


class Validator:
    def __init__(self, config: RequestValidation) -> None:
        self.config = config
        self.blocked = tuple(compile_re2(p) for p in config.blocked_patterns)

    def check(self, body: Any, kind: str) -> bool:
        """Raise Refusal if `body` breaks a limit; returns whether control characters were removed."""
        if not isinstance(body, dict):
            raise Refusal("json", "request body must be a JSON object")
        changed = False
        if self.config.strip_control_characters:
            changed = _rewrite_texts(body, _strip)
        self._tokens(body, kind)
        self._messages(body)
        for text in _texts(body):
            self._text(text)
        return changed

    def _tokens(self, body: dict[str, Any], kind: str) -> None:
        limit = self.config.max_tokens
        keys = ("max_tokens", "max_completion_tokens") if kind == "chat_completions" else ("max_tokens",)
        for key in keys:
            value = body.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise Refusal("max_tokens", f"{key} must be a number")
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
        for i, pattern in enumerate(self.blocked):
            if pattern.search(text) is not None:
                rule = f"blocked_patterns[{i}]"
                raise Refusal(rule, f"request blocked by content rule {rule}")


def _strip(text: str) -> str:
    return _CONTROL.sub("", text)


def _texts(body: dict[str, Any]) -> Iterator[str]:
    found: list[str] = []

    def collect(text: str) -> str:
        found.append(text)
        return text

    _rewrite_texts(body, collect)
    return iter(found)


def _rewrite_texts(body: dict[str, Any], fn: Callable[[str], str]) -> bool:
    """Apply `fn` to every model-readable text in place; returns whether any text changed."""
    changed = False

    def visit(holder: Any, key: Any) -> None:
        nonlocal changed
        value = holder[key]
        if isinstance(value, str):
            new = fn(value)
            if new != value:
                holder[key] = new
                changed = True
        elif isinstance(value, list):
            for i, block in enumerate(value):
                if isinstance(block, str):
                    visit(value, i)
                elif isinstance(block, dict):
                    visit_block(block)

    def visit_block(block: dict[str, Any]) -> None:
        kind = block.get("type")
        if kind in ("text", "input_text") and "text" in block:
            visit(block, "text")
        elif kind == "tool_result" and "content" in block:
            visit(block, "content")

    if "system" in body:
        visit(body, "system")
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, dict) and "content" in message:
                visit(message, "content")
    return changed
