"""Token usage read from model replies, whole or streamed.

Anthropic: `usage` of a Messages reply, of `message_start` (input and cache tokens) and of
`message_delta` (output tokens so far; the API's counts are cumulative, so the latest wins).
OpenAI: `usage` of a Chat Completions reply or of its last chunk (streams carry it when the client
set `stream_options.include_usage`): `prompt_tokens` is counted as input, its
`prompt_tokens_details.cached_tokens` also as cache-read; `completion_tokens` as output. Responses:
`usage` of the response (`input_tokens`, `output_tokens`, `input_tokens_details.cached_tokens`).
A stream cut short keeps what it had seen.
"""

from __future__ import annotations

from typing import Any

import attrs

FIELDS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


@attrs.define
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    seen: bool = False

    @property
    def total(self) -> int:
        """What token budgets charge: input and output tokens."""
        return self.input_tokens + self.output_tokens

    def note(self, value: Any) -> None:
        """Take the usage a reply, an event or a chunk carries, if any."""
        if not isinstance(value, dict):
            return
        usage = value.get("usage")
        if not isinstance(usage, dict):
            inner = value.get("message") or value.get("response")
            usage = inner.get("usage") if isinstance(inner, dict) else None
            if not isinstance(usage, dict):
                return
        self.seen = True
        prompt = _count(usage.get("prompt_tokens"))
        if prompt is not None:  # Chat Completions
            self.input_tokens = prompt
            completion = _count(usage.get("completion_tokens"))
            if completion is not None:
                self.output_tokens = completion
            details = usage.get("prompt_tokens_details")
            cached = _count(details.get("cached_tokens")) if isinstance(details, dict) else None
            if cached is not None:
                self.cache_read_input_tokens = cached
            return
        for field in FIELDS:
            count = _count(usage.get(field))
            if count is not None:
                setattr(self, field, count)
        details = usage.get("input_tokens_details")  # Responses
        cached = _count(details.get("cached_tokens")) if isinstance(details, dict) else None
        if cached is not None:
            self.cache_read_input_tokens = cached

    def fields(self) -> dict[str, int]:
        return {field: getattr(self, field) for field in FIELDS}
