"""The content layer: validates what goes upstream, masks what comes back."""

from __future__ import annotations

import json
from collections import Counter
from typing import TYPE_CHECKING, Any

from twisted.web.http_headers import Headers

from ccproxy import events
from ccproxy.config import Config
from ccproxy.config.content import ContentConfig, ResponseSanitization
from ccproxy.content.masking import (
    Masker,
    PromptRuns,
    Rule,
    RuleSet,
    StreamMasker,
    built_in_rules,
    join_texts,
    mask_strings,
    prompt_runs,
    rule_set,
)
from ccproxy.content.sse import AnthropicStream, OpenAIStream, SseFilter
from ccproxy.content.validation import Refusal, Validator
from ccproxy.context import BodyFilter, Layer, RequestContext
from ccproxy.errors import ApiError
from ccproxy.routes import CHAT_COMPLETIONS, COUNT_TOKENS, MESSAGES

if TYPE_CHECKING:
    from ccproxy.runtime import Deps

_VALIDATED = frozenset({MESSAGES, COUNT_TOKENS, CHAT_COMPLETIONS})
# count_tokens answers with numbers only: no model text to mask.
_SANITIZED = frozenset({MESSAGES, CHAT_COMPLETIONS})


class ContentLayer(Layer):
    def __init__(self, config: ContentConfig) -> None:
        self.config = config
        validation = config.request_validation
        self.validator = Validator(validation) if validation.enabled else None
        self.sanitization = config.response_sanitization
        self.rules: RuleSet | None = None
        if self.sanitization.enabled:
            self.rules = rule_set(_rules(self.sanitization))

    def idle(self) -> frozenset[str]:
        steps = set()
        if self.rules is None:
            steps.add("response_filter")
            if self.validator is None:
                steps.add("check_body")
        return frozenset(steps)

    async def check_body(self, ctx: RequestContext) -> None:
        if ctx.route.kind not in _VALIDATED:
            return
        if self.validator is not None:
            self._validate(ctx, self.validator)
        if self.rules is not None and ctx.route.kind in _SANITIZED:
            # Masking needs the plain text: ask the upstream for an unencoded body.
            ctx.headers.removeHeader(b"accept-encoding")

    def _validate(self, ctx: RequestContext, validator: Validator) -> None:
        try:
            body = ctx.json()
            if validator.check(body, ctx.route.kind):
                ctx.replace_json(body)
        except ApiError as e:
            _refused(ctx, "json", e.message, None)
            raise
        except Refusal as refusal:
            _refused(ctx, refusal.rule, refusal.message, refusal.limit)
            raise refusal.api_error() from None

    def response_filter(self, ctx: RequestContext, status: int, headers: Headers) -> BodyFilter | None:
        if self.rules is None or ctx.route.kind not in _SANITIZED or not 200 <= status < 300:
            return None
        content_type = (headers.getRawHeaders(b"content-type") or [b""])[0].lower()
        is_sse = content_type.startswith(b"text/event-stream")
        if not is_sse and not content_type.startswith(b"application/json"):
            return None
        encoding = b",".join(headers.getRawHeaders(b"content-encoding") or []).strip().lower()
        if encoding not in (b"", b"identity"):
            # A body we cannot read could carry anything: refuse it rather than pass it unmasked.
            raise ApiError(502, "upstream response is encoded and cannot be inspected")
        prompt = self._prompt(ctx)
        counts: Counter[str] = Counter()

        def report(found: Counter[str]) -> None:
            _masked(ctx, found, stream=is_sse)

        if is_sse:
            rules = self.rules

            def new_masker() -> StreamMasker:
                return StreamMasker(Masker(rules, prompt), counts)

            stream = AnthropicStream(new_masker) if ctx.api == "anthropic" else OpenAIStream(new_masker)
            return SseFilter(stream, counts, report)
        return JsonFilter(Masker(self.rules, prompt), ctx.api, report)

    def _prompt(self, ctx: RequestContext) -> PromptRuns | None:
        if not self.sanitization.remove_system_prompts:
            return None
        try:
            body = ctx.json()
        except ApiError:
            return None
        text = join_texts(system_texts(body, ctx.api))
        if len(text) < self.sanitization.system_prompt_min_length:
            return None
        return prompt_runs(text, self.sanitization.system_prompt_min_length)


def _rules(config: ResponseSanitization) -> tuple[Rule, ...]:
    own = tuple(Rule(p.name, p.pattern, p.replacement) for p in config.mask_patterns)
    return built_in_rules(config.mask_api_keys, config.mask_emails, config.mask_phone_numbers) + own


def system_texts(body: Any, api: str) -> list[str]:
    """The system prompt's texts: Anthropic `system`; OpenAI `system`/`developer` messages."""
    if not isinstance(body, dict):
        return []
    if api == "anthropic":
        return _content_texts(body.get("system"))
    found: list[str] = []
    for message in body.get("messages") or []:
        if isinstance(message, dict) and message.get("role") in ("system", "developer"):
            found.extend(_content_texts(message.get("content")))
    return found


def _content_texts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [b["text"] for b in content if isinstance(b, dict) and isinstance(b.get("text"), str)]
    return []


class JsonFilter:
    """Masks a whole JSON response: text blocks, tool input strings, OpenAI message content."""

    buffered = True

    def __init__(self, masker: Masker, api: str, report: Any) -> None:
        self.masker = masker
        self.api = api
        self.report = report
        self.chunks: list[bytes] = []

    def feed(self, data: bytes) -> bytes:
        self.chunks.append(data)
        return b""

    def close(self) -> bytes:
        body = b"".join(self.chunks)
        self.chunks = []
        counts: Counter[str] = Counter()
        try:
            value = json.loads(body)
            if self.api == "anthropic":
                _mask_message(value, self.masker, counts)
            else:
                _mask_completion(value, self.masker, counts)
            out = json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode() if counts else body
        except (ValueError, UnicodeDecodeError, RecursionError):
            # Not the JSON it claims to be, or nested beyond what can be walked: mask it as text so
            # nothing slips through.
            counts.clear()
            out = self.masker.mask_bytes(body, counts)
        self.report(counts)
        return out


def _mask_message(value: Any, masker: Masker, counts: Counter[str]) -> None:
    content = value.get("content") if isinstance(value, dict) else None
    for block in content if isinstance(content, list) else []:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text" and isinstance(block.get("text"), str):
            block["text"] = masker.mask(block["text"], counts)
        elif block.get("type") in ("tool_use", "server_tool_use") and "input" in block:
            block["input"] = mask_strings(block["input"], masker, counts)


def _mask_completion(value: Any, masker: Masker, counts: Counter[str]) -> None:
    choices = value.get("choices") if isinstance(value, dict) else None
    for choice in choices if isinstance(choices, list) else []:
        message = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, str):
            message["content"] = masker.mask(content, counts)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    part["text"] = masker.mask(part["text"], counts)
        for call in message.get("tool_calls") or []:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                function["arguments"] = _mask_arguments(function["arguments"], masker, counts)


def _mask_arguments(arguments: str, masker: Masker, counts: Counter[str]) -> str:
    before = sum(counts.values())
    try:
        parsed = json.loads(arguments)
        masked = mask_strings(parsed, masker, counts)
        return arguments if sum(counts.values()) == before else json.dumps(masked, ensure_ascii=False)
    except (ValueError, RecursionError):
        return masker.mask(arguments, counts)


def _who(ctx: RequestContext) -> dict[str, Any]:
    identity = ctx.identity
    return {
        "request_id": ctx.request_id,
        "ip_address": ctx.client_ip,
        "api_key_id": identity.key_id if identity else None,
        "user_id": identity.user_id if identity else None,
        "method": ctx.method.decode("latin-1"),
        "path": ctx.path.decode("latin-1")[:200],
    }


def _refused(ctx: RequestContext, rule: str, reason: str, limit: int | None) -> None:
    events.emit("invalid_request", "warning", rule=rule, reason=reason, limit=limit, status=400, **_who(ctx))


def _masked(ctx: RequestContext, counts: Counter[str], stream: bool) -> None:
    if counts:
        events.emit("response_masked", "info", counts=dict(counts), total=sum(counts.values()),
                    stream=stream, **_who(ctx))


def build_layer(config: Config, deps: Deps, previous: Layer | None) -> Layer:
    """The layer keeps no state to carry over."""
    return ContentLayer(config.content)
