"""The HTTP face of ccproxy: health checks, then every other request through the layers and upstream."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from ccproxy import events
from ccproxy.context import RequestContext, new_request_id
from ccproxy.errors import ApiError, error_body
from ccproxy.forward import response_headers, upstream_headers
from ccproxy.http.client import UpstreamResponse
from ccproxy.http.request import ProxyRequest as Request
from ccproxy.relay import Relay
from ccproxy.routes import api_for, compile_allowed, route
from ccproxy.runtime import Runtime, RuntimeHolder

log = Logger()

_PHRASES = {529: b"Overloaded"}
# What render returns when the response will come later (twisted.web's value, without importing
# twisted.web.server and all it brings for this one constant).
NOT_DONE_YET = 1
_REFUSED_METHODS = frozenset({b"CONNECT", b"TRACE"})


class ProxyResource:
    def __init__(self, holder: RuntimeHolder, clock: IReactorTime) -> None:
        self.holder = holder
        self.clock = clock

    def render(self, request: Request) -> Any:
        """Called when the head is complete: the body is read only once the head checks pass."""
        request.response_headers.setRawHeaders(b"server", [b"ccproxy"])
        if request.path in (b"/health", b"/ready") and request.method not in _REFUSED_METHODS:
            return self._health(request)
        d = defer.ensureDeferred(self._handle(request, self.holder.current))
        request.when_finished().addErrback(lambda _: d.cancel())
        d.addErrback(self._unexpected, request)
        return NOT_DONE_YET

    def completed(self, request: Request) -> None:
        """End-of-request hook of the layers (the site calls it when the response is complete)."""
        runtime = self.holder.current
        if runtime.completers:
            runtime.completed(request.ctx, request, request.status)

    def _health(self, request: Request) -> bytes:
        request_id = new_request_id()
        request.request_id = request_id
        request.set_header(b"content-type", b"application/json")
        request.set_header(b"request-id", request_id.encode())
        self.holder.current.decorate(None, request, request.response_headers)
        if request.path == b"/health":
            return b'{"status":"ok"}'
        if self.holder.ready:
            incident = self.holder.current.deps.incident
            if incident is not None and incident.emergency:
                return self.holder.ready_body[:-1] + b',"emergency":true}'
            return self.holder.ready_body
        request.set_status(503)
        return b'{"status":"starting"}'

    async def _handle(self, request: Request, runtime: Runtime) -> None:
        request_id = new_request_id()
        request.request_id = request_id
        ctx: RequestContext | None = None
        try:
            if request.method in _REFUSED_METHODS:
                raise ApiError(405, f"method {request.method.decode('latin-1')} is not allowed")
            config = runtime.config
            target = route(request.target, config.upstreams, compile_allowed(config.content.routes.allow))
            ctx = RequestContext(
                request=request,
                request_id=request_id,
                route=target,
                client_ip=_client_host(request),
                peer_ip=request.peer_host(),
                started=self.clock.seconds(),
                body=b"",
                method=request.method,
                path=request.path,
                # The context's own copy: layers edit what goes upstream (credentials stripped, ...),
                # while the request keeps what the client sent (X-Forwarded-For is read from it).
                headers=request.request_headers.copy(),
            )
            request.ctx = ctx
            for layer in runtime.head_checkers:
                await layer.check(ctx)
            # Only now is the body read (and `100 Continue` sent): a refusal above cost it nothing.
            body = request.body_now()
            ctx.body = body if body is not None else await request.read_body()
            for layer in runtime.body_checkers:
                await layer.check_body(ctx)
            await self._forward(ctx, runtime)
        except ApiError as e:
            self._send_error(request, runtime, ctx, e)
        except defer.CancelledError:
            # The client went away; whatever was under way upstream has been stopped.
            return

    async def _forward(self, ctx: RequestContext, runtime: Runtime) -> None:
        request, target = ctx.request, ctx.route
        headers = upstream_headers(ctx.headers, target.upstream, target.api)
        try:
            response = await runtime.forwarder.send(ctx.method, target, headers, ctx.body)
        except ApiError as e:
            _upstream_error(ctx, e.status, e.message)
            raise
        if response.code >= 500:
            _upstream_error(ctx, response.code, f"upstream answered {response.code}")
        upstream_id = response.headers.getRawHeaders(b"request-id") or response.headers.getRawHeaders(
            b"x-request-id"
        )
        if upstream_id:
            ctx.upstream_request_id = upstream_id[0].decode("latin-1")
        body_filter = runtime.response_filter(ctx, response.code, response.headers)
        rewrites = body_filter is not None and not getattr(body_filter, "transparent", False)
        content_type = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
        relay = Relay(
            request,
            self.clock,
            target.upstream.read_timeout,
            # A transparent filter (one that only reads) keeps the upstream's framing.
            lambda length: self._write_head(ctx, runtime, response, rewrites, length),
            target.api,
            sse=content_type.startswith(b"text/event-stream"),
            body_filter=body_filter,
            buffered=bool(body_filter is not None and getattr(body_filter, "buffered", False)),
            on_broken=lambda error: _upstream_error(ctx, error.status, error.message),
            budget=runtime.deps.buffers,
        )
        response.deliverBody(relay)
        relay.watch()
        await relay.done

    def _write_head(
        self, ctx: RequestContext, runtime: Runtime, response: UpstreamResponse, filtered: bool, length: int | None
    ) -> None:
        request = ctx.request
        request.set_status(response.code, response.phrase)
        # The upstream's headers become the response's (no copy); what ccproxy set before stays
        # only where the upstream sent no header of that name.
        out = response_headers(response.headers, keep_length=not filtered and response.length is not UNKNOWN_LENGTH)
        for name, values in request.response_headers.getAllRawHeaders():
            if not out.hasHeader(name):
                out.setRawHeaders(name, values)
        request.response_headers = out
        if length is not None:
            out.setRawHeaders(b"content-length", [str(length).encode()])
        if not out.hasHeader(b"request-id"):
            out.setRawHeaders(b"request-id", [(ctx.upstream_request_id or ctx.request_id).encode()])
        self._finish_headers(ctx, runtime, request, out)

    def _finish_headers(
        self, ctx: RequestContext | None, runtime: Runtime, request: Request, out: Headers
    ) -> None:
        if ctx is not None:
            for name, value in ctx.extra_headers.items():
                out.setRawHeaders(name.encode(), [value.encode()])
        runtime.decorate(ctx, request, out)

    def _send_error(self, request: Request, runtime: Runtime, ctx: RequestContext | None, error: ApiError) -> None:
        if request.finished or request._disconnected:
            return
        if request.head_sent:
            # Too late for an error response: cut the connection so the client sees a broken reply.
            request.abort()
            return
        api = ctx.api if ctx is not None else api_for(request.target)
        body = error_body(api, error)
        request.set_status(error.status, _PHRASES.get(error.status))
        out = request.response_headers
        out.setRawHeaders(b"content-type", [b"application/json"])
        out.setRawHeaders(b"content-length", [str(len(body)).encode()])
        out.setRawHeaders(b"request-id", [request.request_id.encode()])
        for name, value in error.headers.items():
            out.setRawHeaders(name.encode(), [value.encode()])
        self._finish_headers(ctx, runtime, request, out)
        request.write(body)
        request.finish()

    def _unexpected(self, failure: Failure, request: Request) -> None:
        log.failure("unexpected error handling {uri}", failure, uri=_loggable(request.target))
        try:
            self._send_error(request, self.holder.current, None, ApiError(500, "internal proxy error"))
        except Exception:
            log.failure("could not answer after an internal error")


def _loggable(uri: bytes) -> str:
    # Query strings may carry tokens; logs get the path alone.
    return uri.split(b"?", 1)[0].decode("latin-1")[:200]


def _client_host(request: Request) -> str:
    return str(getattr(request.client_address(), "host", ""))


def _upstream_error(ctx: RequestContext, status: int, reason: str) -> None:
    events.emit(
        "upstream_error",
        "error" if status in (502, 504) else "warning",
        request_id=ctx.request_id,
        ip_address=ctx.client_ip,
        api_key_id=ctx.identity.key_id if ctx.identity is not None else None,
        upstream=ctx.route.upstream.name,
        status=status,
        reason=reason,
    )
