"""Which upstream a path belongs to, and what it is called there."""

from __future__ import annotations

import re

import attrs

from ccproxy.config.server import UpstreamConfig, UpstreamsConfig
from ccproxy.errors import ANTHROPIC, OPENAI, ApiError

MESSAGES = "messages"
COUNT_TOKENS = "count_tokens"
CHAT_COMPLETIONS = "chat_completions"
OTHER = "other"

_KINDS = {
    (ANTHROPIC, b"/v1/messages"): MESSAGES,
    (ANTHROPIC, b"/v1/messages/count_tokens"): COUNT_TOKENS,
    (OPENAI, b"/v1/chat/completions"): CHAT_COMPLETIONS,
}

# Paths that could be read differently by ccproxy's checks and by the upstream are refused:
# dot segments, empty segments, encoded slashes, dots or backslashes.
_AMBIGUOUS = re.compile(rb"(^|/)\.\.?(/|$)|//|%2[fFeE]|%5[cC]|\\")


@attrs.frozen
class Route:
    api: str
    upstream: UpstreamConfig
    path: bytes  # the path (and query) to request upstream, without the base URL
    kind: str


def route(target: bytes, upstreams: UpstreamsConfig) -> Route:
    """Map a request target to its upstream; unknown paths are a 404 in Anthropic's shape."""
    path, sep, query = target.partition(b"?")
    if _AMBIGUOUS.search(path):
        raise ApiError(400, "request path is not in normal form")
    if path.startswith(b"/openai/"):
        api, upstream, rest = OPENAI, upstreams.openai, path[len(b"/openai") :]
    elif path.startswith(b"/v1/") or path == b"/v1":
        api, upstream, rest = ANTHROPIC, upstreams.anthropic, path
    else:
        raise ApiError(404, f"no route for {path.decode('latin-1')[:200]!r}")
    return Route(api, upstream, rest + sep + query, _KINDS.get((api, rest), OTHER))


def api_for(target: bytes) -> str:
    """Which API's error shape a request expects, even when it cannot be routed."""
    return OPENAI if target.startswith(b"/openai/") else ANTHROPIC
