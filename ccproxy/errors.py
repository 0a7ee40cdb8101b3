"""Errors that ccproxy answers itself, in the shape of the API the client called."""

from __future__ import annotations

import json
from collections.abc import Mapping

import attrs

ANTHROPIC = "anthropic"
OPENAI = "openai"

# Anthropic's error type for each status ccproxy may answer with.
TYPE_FOR_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    431: "request_too_large",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}

# OpenAI's error bodies carry a type and a code of their own naming.
_OPENAI_TYPE = {
    "invalid_request_error": "invalid_request_error",
    "authentication_error": "invalid_request_error",
    "permission_error": "invalid_request_error",
    "not_found_error": "invalid_request_error",
    "request_too_large": "invalid_request_error",
    "rate_limit_error": "requests",
    "timeout_error": "server_error",
    "api_error": "server_error",
    "overloaded_error": "server_error",
}
_OPENAI_CODE = {
    "authentication_error": "invalid_api_key",
    "permission_error": "permission_denied",
    "not_found_error": "not_found",
    "request_too_large": "request_too_large",
    "rate_limit_error": "rate_limit_exceeded",
    "timeout_error": "timeout",
    "overloaded_error": "service_unavailable",
}


@attrs.define
class ApiError(Exception):
    """Raised anywhere in the request path to answer the client with an error of its API's shape."""

    status: int
    message: str
    type: str | None = None
    headers: Mapping[str, str] = attrs.field(factory=dict)

    @property
    def error_type(self) -> str:
        return self.type or TYPE_FOR_STATUS.get(self.status, "api_error")

    def __str__(self) -> str:
        return f"{self.status} {self.error_type}: {self.message}"


def error_body(api: str, error: ApiError) -> bytes:
    kind = error.error_type
    if api == OPENAI:
        body: dict[str, object] = {
            "error": {
                "message": error.message,
                "type": _OPENAI_TYPE.get(kind, "invalid_request_error"),
                "param": None,
                "code": _OPENAI_CODE.get(kind, kind),
            }
        }
    else:
        body = {"type": "error", "error": {"type": kind, "message": error.message}}
    return json.dumps(body, separators=(",", ":")).encode()


def sse_error_event(api: str, error: ApiError) -> bytes:
    """The event that tells a streaming client the stream broke, before a clean close."""
    body = error_body(api, error)
    if api == OPENAI:
        return b"data: " + body + b"\n\n"
    return b"event: error\ndata: " + body + b"\n\n"
