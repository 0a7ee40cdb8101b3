"""What every layer knows about the request being handled."""

from __future__ import annotations

import itertools
import json
import secrets
from typing import TYPE_CHECKING, Any, Protocol

import attrs
from twisted.web.http_headers import Headers

from ccproxy.errors import ApiError
from ccproxy.routes import Route

if TYPE_CHECKING:
    from ccproxy.http.request import ProxyRequest as Request

# Unique, not secret: a random per-process prefix and a counter, no system call per request.
_ID_PREFIX = "req_ccp_" + secrets.token_hex(6)
_ids = itertools.count(1)


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ids):012x}"


@attrs.define
class Identity:
    """Who is calling, once authenticated. Never holds the credential itself."""

    key_id: str
    name: str | None = None
    tier: str = "default"
    user_id: str | None = None
    # The key's own requests-per-minute limit, if it has one.
    rate_limit: int | None = None


class BodyFilter(Protocol):
    """Rewrites a response body. `feed` returns what may be sent now; `close` the rest."""

    def feed(self, data: bytes) -> bytes: ...

    def close(self) -> bytes: ...


# attrs.NOTHING as a default means "no default": the body not parsed yet needs a marker of its own.
_UNPARSED: Any = object()


@attrs.define
class RequestContext:
    request: Request
    request_id: str
    route: Route
    client_ip: str
    started: float
    body: bytes
    identity: Identity | None = None
    # The connection's own peer: client_ip differs from it only behind a trusted proxy.
    peer_ip: str = ""
    # Headers every response to this request carries (rate-limit state, key expiry, ...).
    extra_headers: dict[str, str] = attrs.field(factory=dict)
    upstream_request_id: str | None = None
    # The request line's method and path (without the query), and the headers that go upstream:
    # layers read and edit these (credentials stripped, ...), not the client's request object.
    method: bytes = b""
    path: bytes = b""
    headers: Headers = attrs.field(factory=Headers)
    # Whether the limits layer counted this request (those refused before it count at the end).
    limits_checked: bool = False
    # Token usage read from the reply (a ccproxy.content.usage.Usage), once a reply is under way.
    usage: Any = None
    _json: Any = attrs.field(default=_UNPARSED, alias="_json", init=False)

    @property
    def api(self) -> str:
        return self.route.api

    def json(self) -> Any:
        """The request body as JSON (parsed once); a body that is not JSON is a 400."""
        if self._json is _UNPARSED:
            try:
                self._json = json.loads(self.body)
            except (ValueError, UnicodeDecodeError):
                raise ApiError(400, "request body is not valid JSON") from None
            except RecursionError:
                raise ApiError(400, "request body nests JSON too deeply") from None
        return self._json

    def set_json(self, value: Any) -> None:
        """The body, already parsed (strictly) by a check: later readers reuse it."""
        self._json = value

    def replace_json(self, value: Any) -> None:
        """Forward `value` instead of the body the client sent."""
        self._json = value
        self.body = json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()

    def header(self, name: bytes) -> str | None:
        value = self.headers.getRawHeaders(name)
        return value[0].decode("latin-1") if value else None


class Layer:
    """One policy layer. Override only what the layer takes part in.

    Layers run in a fixed order; `check` and `check_body` may refuse by raising ApiError, and must
    not touch the response itself.
    """

    async def check(self, ctx: RequestContext) -> None:
        """Decide from the head alone (method, path, headers, addresses): it runs before the body
        is read or `100 Continue` sent, so a refusal costs the client's body nothing. `ctx.body`
        is still empty here."""
        return None

    async def check_body(self, ctx: RequestContext) -> None:
        """Decide from the body (`ctx.body`, `ctx.json()`), once every head check has passed."""
        return None

    def response_filter(self, ctx: RequestContext, status: int, headers: Headers) -> BodyFilter | None:
        return None

    def decorate(self, ctx: RequestContext | None, request: Request, headers: Headers) -> None:
        """Add headers to every response ccproxy sends, its own errors included."""
        return None

    def completed(self, ctx: RequestContext | None, request: Request, status: int) -> None:
        """End-of-request work (counting, records), once the response to `request` is complete;
        `ctx` is None for requests answered before one was made (/health, unknown routes)."""
        return None

    def idle(self) -> frozenset[str]:
        """The steps ("check", "check_body", "response_filter", "decorate", "completed") this layer, as configured, has
        nothing to do in: the runtime skips them for every request."""
        return frozenset()

    def stop(self) -> Any:
        return None
