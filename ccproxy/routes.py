"""Which upstream a path belongs to, what it is called there, and what kind of endpoint it is.

Routes fail closed: a path is forwarded only when it is exactly one of the API paths below (or one
listed in `security.routes.allow`). Anything else, including a trailing slash, a `;` parameter, a
percent-encoded character, a dot segment or a case variant, is refused, never normalised: a check
made on one reading of a path must hold for the upstream's reading too.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

import attrs

from ccproxy.config.server import UpstreamConfig, UpstreamsConfig
from ccproxy.errors import ANTHROPIC, OPENAI, ApiError

MESSAGES = "messages"
COUNT_TOKENS = "count_tokens"
BATCHES = "batches"  # create (POST) or list
BATCH = "batch"  # one batch, its cancel
BATCH_RESULTS = "batch_results"  # JSON lines of Messages replies
COMPLETE = "complete"  # Anthropic's legacy Text Completions
MODELS = "models"
CHAT_COMPLETIONS = "chat_completions"
COMPLETIONS = "completions"  # OpenAI's legacy Completions
RESPONSES = "responses"  # create a response
RESPONSE = "response"  # one response: read, cancel (replies shaped as a response)
OTHER = "other"  # a path allowed by the config: forwarded unchecked, replies masked as any JSON

# One path segment that names an object (a batch, a model, a response).
_ID = r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,199}"
_TABLE: dict[str, tuple[tuple[str, str], ...]] = {
    ANTHROPIC: (
        ("/v1/messages", MESSAGES),
        ("/v1/messages/count_tokens", COUNT_TOKENS),
        ("/v1/messages/batches", BATCHES),
        (f"/v1/messages/batches/{_ID}", BATCH),
        (f"/v1/messages/batches/{_ID}/cancel", BATCH),
        (f"/v1/messages/batches/{_ID}/results", BATCH_RESULTS),
        ("/v1/complete", COMPLETE),
        ("/v1/models", MODELS),
        (f"/v1/models/{_ID}", MODELS),
    ),
    OPENAI: (
        ("/v1/chat/completions", CHAT_COMPLETIONS),
        ("/v1/completions", COMPLETIONS),
        ("/v1/responses", RESPONSES),
        (f"/v1/responses/{_ID}", RESPONSE),
        (f"/v1/responses/{_ID}/cancel", RESPONSE),
        (f"/v1/responses/{_ID}/input_items", OTHER),
        ("/v1/models", MODELS),
        (f"/v1/models/{_ID}", MODELS),
    ),
}
_KNOWN = {api: [(re.compile(p + r"\Z"), kind) for p, kind in rows] for api, rows in _TABLE.items()}

# Paths that could be read differently by ccproxy's checks and by the upstream are refused with a
# 400 before any lookup: dot segments, empty segments, backslashes, `;` parameters, `#` fragments
# and any percent-encoding (no API path needs one).
_AMBIGUOUS = re.compile(rb"(^|/)\.\.?(/|$)|//|[%;#\\]")


@attrs.frozen
class Route:
    api: str
    upstream: UpstreamConfig
    path: bytes  # the path (and query) to request upstream, without the base URL
    kind: str


def allowed_path(pattern: str) -> re.Pattern[str]:
    """A config `routes.allow` entry: a path, where a `*` segment stands for one id segment."""
    parts = [(_ID if seg == "*" else re.escape(seg)) for seg in pattern.split("/")]
    return re.compile("/".join(parts) + r"\Z")


@functools.lru_cache(maxsize=8)
def compile_allowed(allow: tuple[str, ...]) -> tuple[re.Pattern[str], ...]:
    return tuple(allowed_path(p) for p in allow)


def route(target: bytes, upstreams: UpstreamsConfig, allow: Sequence[re.Pattern[str]] = ()) -> Route:
    """Map a request target to its upstream; a path that is not exactly an API path is refused."""
    path, sep, query = target.partition(b"?")
    if _AMBIGUOUS.search(path):
        raise ApiError(400, "request path is not in normal form")
    if path.startswith(b"/openai/"):
        api, upstream, rest = OPENAI, upstreams.openai, path[len(b"/openai") :]
    elif path.startswith(b"/v1/") or path == b"/v1":
        api, upstream, rest = ANTHROPIC, upstreams.anthropic, path
    else:
        raise ApiError(404, f"no route for {path.decode('latin-1')[:200]!r}", type="not_found_error")
    text = rest.decode("latin-1")
    kind = next((k for regex, k in _KNOWN[api] if regex.match(text)), None)
    if kind is None and any(regex.match(path.decode("latin-1")) for regex in allow):
        kind = OTHER
    if kind is None:
        raise ApiError(404, f"no route for {path.decode('latin-1')[:200]!r}", type="not_found_error")
    return Route(api, upstream, rest + sep + query, kind)


def api_for(target: bytes) -> str:
    """Which API's error shape a request expects, even when it cannot be routed."""
    return OPENAI if target.startswith(b"/openai/") else ANTHROPIC
