"""The kinds of response parts masking tells apart, and which request asks for structured output.

A reply holds parts a person reads (text, thinking, refusals, citations, error messages) and parts a
program acts on (tool inputs, structured outputs). Masking a part a program acts on changes what the
program does: a path in a `Read` call, the content of a `Write`. So by default only what a person
reads is masked; `response_sanitization.mask_parts` says otherwise per kind.
"""

from __future__ import annotations

from typing import Any

import attrs

TEXT = "text"
THINKING = "thinking"
TOOL_INPUTS = "tool_inputs"
STRUCTURED_OUTPUTS = "structured_outputs"
KINDS = (TEXT, THINKING, TOOL_INPUTS, STRUCTURED_OUTPUTS)


@attrs.frozen
class Parts:
    """Which kinds of parts are masked. `text` covers every text a person reads: text blocks and
    deltas, citations' quoted text, refusals, error messages from the model upstream."""

    text: bool = True
    thinking: bool = True
    tool_inputs: bool = False
    structured_outputs: bool = False

    def masks(self, kind: str) -> bool:
        return bool(getattr(self, kind))

    def text_kind(self, structured: bool) -> str:
        """The kind of a reply's text: structured output when the request asked for JSON."""
        return STRUCTURED_OUTPUTS if structured else TEXT


DEFAULT_PARTS = Parts()


def asks_structured_output(body: Any) -> bool:
    """Whether a request asks for a reply that is a JSON document for a program to read.

    Anthropic: `output_format` (or `output_config.format`) of type `json_schema`; OpenAI:
    `response_format` of type `json_schema` or `json_object`, or Responses `text.format`.
    """
    if not isinstance(body, dict):
        return False
    candidates = [body.get("output_format"), body.get("response_format")]
    for holder in ("output_config", "text"):
        inner = body.get(holder)
        if isinstance(inner, dict):
            candidates.append(inner.get("format"))
    return any(isinstance(c, dict) and c.get("type") in ("json_schema", "json_object") for c in candidates)
