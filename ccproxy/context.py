"""What every layer knows about the request being handled."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Protocol

import attrs
from twisted.web.http_headers import Headers

from ccproxy.errors import ApiError
from ccproxy.routes import Route

if TYPE_CHECKING:
    from ccproxy.network.request import ProxyRequest as Request


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
        value = self.request.requestHeaders.getRawHeaders(name)
        return value[0].decode("latin-1") if value else None


class Layer:
    """One policy layer. Override only what the layer takes part in.

    Layers run in a fixed order; `check` may refuse by raising ApiError, and must not touch the
    response itself.
    """

    async def check(self, ctx: RequestContext) -> None:
        return None

    def response_filter(self, ctx: RequestContext, status: int, headers: Headers) -> BodyFilter | None:
        return None

    def decorate(self, ctx: RequestContext | None, request: Request, headers: Headers) -> None:
        """Add headers to every response ccproxy sends, its own errors included."""
        return None

    def idle(self) -> frozenset[str]:
        """The steps ("check", "response_filter", "decorate") this layer, as configured, has
        nothing to do in: the runtime skips them for every request."""
        return frozenset()

    def stop(self) -> Any:
        return None
