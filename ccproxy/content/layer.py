"""The content layer: validates what goes upstream, masks what comes back."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
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
    built_in_rules,
    join_texts,
    prompt_runs,
    rule_set,
)
from ccproxy.content.parts import TEXT, asks_structured_output
from ccproxy.content.replies import (
    PartMasker,
    UnsafeReply,
    Walker,
    dumps,
    mask_any,
    mask_batch_line,
    mask_completion,
    mask_message,
    mask_responses,
    strict_loads,
)
from ccproxy.content.sse import (
    AnthropicStream,
    GenericStream,
    OpenAIStream,
    ResponsesStream,
    SseFilter,
    UsageObserver,
)
from ccproxy.content.usage import Usage
from ccproxy.content.validation import Refusal, Validator
from ccproxy.context import BodyFilter, Layer, RequestContext
from ccproxy.errors import ANTHROPIC, ApiError
from ccproxy.routes import (
    BATCH_RESULTS,
    BATCHES,
    CHAT_COMPLETIONS,
    COMPLETE,
    COMPLETIONS,
    COUNT_TOKENS,
    MESSAGES,
    RESPONSE,
    RESPONSES,
)

if TYPE_CHECKING:
    from ccproxy.runtime import Deps

# Replies whose token usage is read (for the access record and token budgets).
_COUNTED = frozenset({MESSAGES, CHAT_COMPLETIONS, COMPLETIONS, RESPONSES, COMPLETE})
_VALIDATED = frozenset({MESSAGES, COUNT_TOKENS, CHAT_COMPLETIONS, BATCHES, COMPLETE, COMPLETIONS, RESPONSES})
# The header that tells a client a JSON reply was altered, and what replaced how often.
MASKED_HEADER = "x-ccproxy-masked"
# The shortest run that may count as an echo of a system prompt, however short the prompt.
_MIN_RUN_FLOOR = 16


def walker_for(kind: str) -> Walker:
    if kind in (MESSAGES, COMPLETE):
        return mask_message
    if kind in (CHAT_COMPLETIONS, COMPLETIONS):
        return mask_completion
    if kind in (RESPONSES, RESPONSE):
        return mask_responses
    if kind == BATCH_RESULTS:
        return mask_batch_line
    # Error replies of any route, and routes of unknown shape: every string is read by someone.
    return mask_any


class ContentLayer(Layer):
    def __init__(self, config: ContentConfig, count_usage: bool = True) -> None:
        self.config = config
        self.count_usage = count_usage
        validation = config.request_validation
        self.validator = Validator(validation) if validation.enabled else None
        self.sanitization = config.response_sanitization
        self.rules: RuleSet | None = None
        if self.sanitization.enabled:
            self.rules = rule_set(_rules(self.sanitization))

    def idle(self) -> frozenset[str]:
        steps = set()
        if self.rules is None:
            if not self.count_usage:
                steps.add("response_filter")
            if self.validator is None:
                steps.add("check_body")
        return frozenset(steps)

    async def check_body(self, ctx: RequestContext) -> None:
        if self.validator is not None and ctx.route.kind in _VALIDATED and ctx.method == b"POST":
            self._validate(ctx, self.validator)
        if self.rules is not None:
            # Masking needs the plain text: ask the upstream for an unencoded body.
            ctx.headers.removeHeader(b"accept-encoding")

    def _validate(self, ctx: RequestContext, validator: Validator) -> None:
        try:
            body = validator.parse(ctx.body)
            if validator.check(body, ctx.route.kind, ctx.api):
                ctx.replace_json(body)
            else:
                ctx.set_json(body)
        except Refusal as refusal:
            _refused(ctx, refusal.rule, refusal.message, refusal.limit)
            raise refusal.api_error() from None

    def response_filter(self, ctx: RequestContext, status: int, headers: Headers) -> BodyFilter | None:
        content_type = (headers.getRawHeaders(b"content-type") or [b""])[0].lower()
        is_sse = content_type.startswith(b"text/event-stream")
        counted = self.count_usage and 200 <= status < 300 and ctx.route.kind in _COUNTED
        note: Callable[[dict[str, Any]], None] | None = None
        if counted:
            usage = ctx.usage = Usage()
            note = usage.note
        if self.rules is None:
            if note is None or not (is_sse or content_type.startswith(b"application/json")):
                return None
            return UsageObserver(note, is_sse)
        # A batch's results are JSON lines whatever type they are labelled with.
        is_json = b"json" in content_type.split(b";")[0] or (ctx.route.kind == BATCH_RESULTS and not is_sse)
        if not is_sse and not is_json:
            return None
        if not 200 <= status < 300 and not is_json:
            return None
        encoding = b",".join(headers.getRawHeaders(b"content-encoding") or []).strip().lower()
        if encoding not in (b"", b"identity"):
            # A body we cannot read could carry anything: refuse it rather than pass it unmasked.
            raise ApiError(502, "upstream response is encoded and cannot be inspected")
        rules, prompt = self.rules, self._prompt(ctx)
        counts: Counter[str] = Counter()
        pm = PartMasker(lambda: Masker(rules, prompt), self.sanitization.mask_parts,
                        _structured(ctx), counts)

        reported = False

        def report(found: Counter[str]) -> None:
            nonlocal reported
            if not reported:
                reported = True
                _masked(ctx, found, pm, stream=is_sse)

        # A stream cut short never reaches its end: what was masked of it is reported all the same.
        ctx.request.when_finished().addBoth(lambda _: report(counts))

        kind = ctx.route.kind if 200 <= status < 300 else "error"
        if is_sse:
            if kind == MESSAGES and ctx.api == ANTHROPIC:
                stream: Any = AnthropicStream(pm, note)
            elif kind in (CHAT_COMPLETIONS, COMPLETIONS):
                stream = OpenAIStream(pm, note)
            elif kind in (RESPONSES, RESPONSE):
                stream = ResponsesStream(pm, note)
            else:
                stream = GenericStream(pm, note)
            return SseFilter(stream, counts, report)
        lines = kind == BATCH_RESULTS or b"jsonl" in content_type or b"ndjson" in content_type
        return JsonFilter(pm, walker_for(kind), report, lines=lines,
                          on_header=lambda value: ctx.extra_headers.__setitem__(MASKED_HEADER, value),
                          on_value=note)

    def _prompt(self, ctx: RequestContext) -> PromptRuns | None:
        if not self.sanitization.remove_system_prompts:
            return None
        try:
            body = ctx.json()
        except ApiError:
            return None
        text = join_texts(system_texts(body, ctx.api))
        run = min_echo_run(len(text.encode()), self.sanitization)
        if len(text.encode()) < run:
            return None
        return prompt_runs(text, run)


def min_echo_run(prompt_bytes: int, config: ResponseSanitization) -> int:
    """The shortest verbatim run of a prompt of this size that counts as echoing it."""
    share = math.ceil(config.system_prompt_min_share * prompt_bytes)
    return min(config.system_prompt_min_length, max(_MIN_RUN_FLOOR, share))


def _structured(ctx: RequestContext) -> bool:
    try:
        return asks_structured_output(ctx.json())
    except ApiError:
        return False


def _rules(config: ResponseSanitization) -> tuple[Rule, ...]:
    own = tuple(Rule(p.name, p.pattern, p.replacement) for p in config.mask_patterns)
    return built_in_rules(config.mask_api_keys, config.mask_emails, config.mask_phone_numbers) + own


def system_texts(body: Any, api: str) -> list[str]:
    """The system prompt's texts: Anthropic `system` and system-role messages; OpenAI
    `system`/`developer` messages; Responses `instructions`."""
    if not isinstance(body, dict):
        return []
    found: list[str] = []
    if api == ANTHROPIC:
        found.extend(_content_texts(body.get("system")))
    elif isinstance(body.get("instructions"), str):
        found.append(body["instructions"])
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else []:
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
    """Masks a whole JSON reply (or JSON lines) with a walker of its shape.

    A reply with duplicate keys or NaN/Infinity is refused (502): two readers could see different
    values in it. A body that is not JSON is masked as text, so nothing slips through.
    """

    buffered = True

    def __init__(self, pm: PartMasker | Masker, walker: Walker | str, report: Callable[[Counter[str]], None],
                 lines: bool = False, on_header: Callable[[str], None] | None = None,
                 on_value: Callable[[dict[str, Any]], None] | None = None) -> None:
        if isinstance(pm, Masker):  # the whole-text form: every part masked, walker named by API
            masker = pm
            from ccproxy.content.parts import Parts

            pm = PartMasker(lambda: masker, Parts(True, True, True, True), False)
        if isinstance(walker, str):
            walker = mask_message if walker == ANTHROPIC else mask_completion
        self.pm = pm
        self.walker = walker
        self.report = report
        self.lines = lines
        self.on_header = on_header
        self.on_value = on_value
        self.chunks: list[bytes] = []

    def feed(self, data: bytes) -> bytes:
        self.chunks.append(data)
        return b""

    def close(self) -> bytes:
        body = b"".join(self.chunks)
        self.chunks = []
        counts = self.pm.counts
        if self.lines:
            out = b"\n".join(self._one(line) if line.strip() else line for line in body.split(b"\n"))
        else:
            out = self._one(body)
        if counts and self.on_header is not None:
            self.on_header(header_value(counts))
        self.report(counts)
        return out

    def _one(self, body: bytes) -> bytes:
        before = self.pm.counts.total()
        try:
            value = strict_loads(body)
        except UnsafeReply as e:
            raise ApiError(502, f"upstream response is ambiguous JSON ({e})") from None
        except (ValueError, UnicodeDecodeError, RecursionError):
            return self._as_text(body)
        if self.on_value is not None and isinstance(value, dict):
            self.on_value(value)
        try:
            self.walker(value, self.pm)
        except RecursionError:
            return self._as_text(body)
        return dumps(value) if self.pm.counts.total() != before else body

    def _as_text(self, body: bytes) -> bytes:
        # Not the JSON it claims to be, or nested beyond what can be walked: mask it as text.
        if not self.pm.masks(TEXT):
            return body
        before = self.pm.counts.total()
        out = self.pm.whole.mask_bytes(body, self.pm.counts)
        if self.pm.counts.total() != before:
            self.pm.altered.add(TEXT)
        return out


def header_value(counts: Counter[str]) -> str:
    return ", ".join(f"{rule}={n}" for rule, n in sorted(counts.items()))


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


def _masked(ctx: RequestContext, counts: Counter[str], pm: PartMasker, stream: bool) -> None:
    if counts:
        events.emit("response_masked", "info", counts=dict(counts), total=sum(counts.values()),
                    parts=sorted(pm.altered), stream=stream,
                    signalled="sse_comment" if stream else f"header {MASKED_HEADER}", **_who(ctx))


def build_layer(config: Config, deps: Deps, previous: Layer | None) -> Layer:
    """The layer keeps no state to carry over."""
    # Token usage is read from replies only where something uses it: access records, token budgets.
    audit, limits = config.audit, config.limits
    logs_access = audit.enabled and any(output.records == "access" for output in audit.outputs)
    budgets = limits.enabled and any(t.tokens_per_minute or t.daily_token_quota for t in limits.per_key)
    return ContentLayer(config.content, count_usage=bool(logs_access or budgets))
