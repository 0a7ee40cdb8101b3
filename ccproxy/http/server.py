"""The HTTP/1.1 server side: request heads checked whole, deadlines and limits, one request at a time.

Every request is read into this channel's own buffer, its head checked whole (`http1.parse_head`)
and its body read whole (declared length, or chunked with `http1.ChunkedDecoder`) before the
resource sees it, so a pipelined second request cannot slip past the checks. The phases of a
connection:

  HEAD  reading a request head: `header_timeout` runs from its first byte (not reset by later
        bytes); between requests `idle_timeout` runs instead.
  BODY  reading the body: `read_timeout` runs; its size is counted as it arrives.
  BUSY  the request is being answered: no deadline, so a long stream is never cut (the idle timer
        may run on, but acts only on an idle connection). Bytes the client sends meanwhile wait
        in our buffer.
  DEAD  refused: an error went out and the connection is closing; input is ignored.
"""
from __future__ import annotations

from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES
from twisted.web.http_headers import Headers
from zope.interface import implementer

from ccproxy import events
from ccproxy.config.network import NetworkConfig
from ccproxy.context import new_request_id
from ccproxy.errors import ApiError, error_body
from ccproxy.http.http1 import (
    ChunkedDecoder,
    Head,
    Malformed,
    TooLarge,
    has_bare_line_break,
    head_end,
    parse_head,
)
from ccproxy.http.request import ProxyRequest
from ccproxy.network.addresses import canonical
from ccproxy.routes import api_for

log = Logger()

HEAD, BODY, BUSY, DEAD = "head", "body", "busy", "dead"
# Bytes a client may send ahead while a request is being answered, before we stop reading.
PIPELINE_BUFFER = 64 * 1024
# After an error response, how long the client gets to read it before the connection is cut.
LINGER = 2.0
_DONE = Failure(ConnectionDone())


def security_header_lines(config: NetworkConfig, secure: bool) -> list[tuple[bytes, bytes]]:
    out = []
    for name, value in config.security_headers.headers:
        if name.lower() == "strict-transport-security" and not secure:
            continue
        out.append((name.encode(), value.encode()))
    return out


@implementer(IHandshakeListener)
class HardenedChannel(Protocol):
    site: Any
    transport: Any

    def connectionMade(self) -> None:
        self.config: NetworkConfig = self.site.network()
        limits = self.config.ddos
        self.max_request_size = limits.max_request_size
        self.phase = HEAD
        self.pending = bytearray()
        self.head: Head | None = None
        self.request: ProxyRequest | None = None
        self.persistent = True
        self.body: list[bytes] = []
        self.body_left = 0
        self.chunks: ChunkedDecoder | None = None
        self.draining = False
        self.paused = False
        self.timer: IDelayedCall | None = None
        self.linger: IDelayedCall | None = None
        self.secure = ISSLTransport.providedBy(self.transport)
        self.handshaking = self.secure and limits.tls_handshake_timeout is not None
        if self.handshaking:
            self._arm(limits.tls_handshake_timeout, self._handshake_expired)
        else:
            self._arm_idle()

    def callLater(self, seconds: float, fire: Any) -> IDelayedCall:
        return self.site.clock.callLater(seconds, fire)

    def handshakeCompleted(self) -> None:
        if self.handshaking:
            self.handshaking = False
            if self.phase == HEAD and not self.pending:
                self._arm_idle()

    # -- input

    def dataReceived(self, data: bytes) -> None:
        if self.phase == DEAD:
            return
        if self.phase == BODY:
            self._feed_body(data)
            return
        if self.handshaking:
            self.handshakeCompleted()
        self.pending += data
        if self.phase == BUSY:
            if len(self.pending) > PIPELINE_BUFFER and not self.paused:
                self.paused = True
                self.transport.pauseProducing()
            return
        self._drain()

    def _drain(self) -> None:
        # A loop rather than recursion: requests answered synchronously hand back here.
        if self.draining:
            return
        self.draining = True
        try:
            while self.phase == HEAD and self.pending:
                if not self._take_head():
                    break
        finally:
            self.draining = False

    def _take_head(self) -> bool:
        """Read one complete request head from the buffer; False while the head is incomplete."""
        while self.pending.startswith(b"\r\n"):
            # RFC 9112 2.2: an empty line before a request line is ignored.
            del self.pending[:2]
        if not self.pending:
            return False
        limits = self.config.ddos
        end = head_end(self.pending, limits.max_header_size)
        if end == -1:
            if self.timer_kind != "header":
                self._arm(limits.header_timeout, self._header_expired, "header")
            if has_bare_line_break(self.pending):
                # Without this a head ended by bare LFs would wait for the deadline, never complete.
                self._invalid("bare_cr_or_lf", "request head has a bare CR or LF", None)
            return False
        if end == -2:
            self._too_large("header_size", limits.max_header_size, 431, "request head is larger than allowed")
            return False
        raw = bytes(self.pending[:end])
        try:
            head = parse_head(raw)
        except Malformed as e:
            self._invalid(e.reason, e.message, raw)
            return False
        self.head = head
        if head.content_length is not None and head.content_length > limits.max_request_size:
            self._too_large("content_length", limits.max_request_size, 413, "request body is larger than allowed")
            return False
        self._disarm_deadline()
        rest = bytes(self.pending[end + 4 :])
        del self.pending[:]
        self.persistent = head.persistent
        if not head.has_body:
            self.pending += rest
            self._dispatch(b"")
            return True
        self.phase = BODY
        self.body = []
        self.body_left = head.content_length or 0
        self.chunks = ChunkedDecoder(limits.max_request_size) if head.chunked else None
        if head.expect_continue and not rest:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if rest:
            self._feed_body(rest)
        if self.phase == BODY and self.head is head:
            # Armed only for a body still to come: most arrive with their head.
            self._arm(limits.read_timeout, self._body_expired, "body")
        return True

    def _feed_body(self, data: bytes) -> None:
        if self.chunks is not None:
            self._feed_chunked(self.chunks, data)
            return
        # A declared length: exactly that much is the body; what follows is the next request.
        part = data[: self.body_left]
        self.body_left -= len(part)
        self.body.append(part)
        if self.body_left == 0:
            extra = data[len(part) :]
            if extra:
                self.pending += extra
            self._dispatch(b"".join(self.body))

    def _feed_chunked(self, chunks: ChunkedDecoder, data: bytes) -> None:
        try:
            self.body += chunks.feed(data)
        except TooLarge:
            self._too_large("body_size", self.max_request_size, 413, "request body is larger than allowed")
            return
        except Malformed as e:
            self._invalid(e.reason, e.message, None)
            return
        if chunks.done:
            self.pending[:0] = chunks.rest
            self.chunks = None
            self._dispatch(b"".join(self.body))

    def _dispatch(self, body: bytes) -> None:
        """The request is whole: hand it to the resource."""
        head = self.head
        assert head is not None
        self._disarm_deadline()
        self.phase = BUSY
        self.body = []
        if self.site.draining:
            self.persistent = False  # the server is shutting down: `Connection: close` on this response
        headers = Headers()
        for name, value in head.headers:
            headers.addRawHeader(name, value)
        request = ProxyRequest(self, head.method, head.target, headers, body, self.site.clock.seconds())
        self.request = request
        try:
            result = self.site.resource.render(request)
        except Exception:
            log.failure("unexpected error rendering {path}", path=request.path[:200].decode("latin-1"))
            self._internal_error(request)
            return
        if isinstance(result, bytes):
            request.respond(result)

    def _internal_error(self, request: ProxyRequest) -> None:
        if request.startedWriting:
            self.transport.abortConnection()
            return
        self.refuse(500, "internal proxy error")

    def requestDone(self, request: ProxyRequest) -> None:
        """The response is complete: read the next request, or close."""
        if request is not self.request:
            return
        self.request = None
        self.head = None
        if self.phase == DEAD or self.transport is None:
            return
        if not self.persistent or self.site.draining or getattr(self.transport, "disconnecting", False):
            self.phase = DEAD
            self.transport.loseConnection()
            return
        self.phase = HEAD
        if self.paused:
            self.paused = False
            self.transport.resumeProducing()
        if self.pending:
            self._drain()
        else:
            self._arm_idle()

    def connectionLost(self, reason: Failure = _DONE) -> None:
        self._disarm()
        if self.linger is not None and self.linger.active():
            self.linger.cancel()
        self.linger = None
        self.phase = DEAD
        request, self.request = self.request, None
        if request is not None and not request.finished:
            request.connectionLost(reason)

    def loseConnection(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()

    # -- refusals

    def _invalid(self, reason: str, message: str, raw: bytes | None) -> None:
        if self.phase == DEAD:
            return
        if raw is not None and self.head is None:
            # Which API's error shape to answer in, from the target as far as it can be read.
            parts = raw.split(b"\r\n", 1)[0].split(b" ")
            self.error_target = parts[1] if len(parts) > 1 else b"/"
        events.emit("invalid_request", "warning", reason=reason, ip_address=self._peer(), **self._what())
        self.refuse(400, message)

    def _too_large(self, reason: str, limit: int, status: int, message: str) -> None:
        events.emit("request_too_large", "warning", reason=reason, limit=limit, status=status,
                    ip_address=self._peer(), **self._what())
        self.refuse(status, message)

    def _what(self) -> dict[str, str]:
        if self.head is None:
            return {}
        return {"method": self.head.method.decode("latin-1"),
                "path": self.head.target.split(b"?", 1)[0].decode("latin-1")[:200]}

    def refuse(self, status: int, message: str) -> None:
        """Answer with an error of the API's shape and close; nothing more is read from the client."""
        if self.phase == DEAD or self.transport is None:
            return
        self.phase = DEAD
        self._disarm()
        self.body = []
        target = self.head.target if self.head is not None else self.error_target
        body = error_body(api_for(target), ApiError(status, message))
        lines = [b"HTTP/1.1 %d %s" % (status, RESPONSES.get(status, b"Error"))]
        headers = [
            (b"Content-Type", b"application/json"),
            (b"Content-Length", str(len(body)).encode()),
            (b"request-id", new_request_id().encode()),
            (b"Connection", b"close"),
            (b"Server", b"ccproxy"),
            *security_header_lines(self.config, self.secure),
        ]
        lines += [name + b": " + value for name, value in headers]
        self.transport.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        self.loseConnection()
        # A client that never reads would keep the connection (and its buffers) forever.
        self.linger = self.callLater(LINGER, self._abort)

    def _abort(self) -> None:
        self.linger = None
        if self.transport is not None:
            self.transport.abortConnection()

    # -- timers

    timer_kind = ""
    error_target = b"/"

    def _arm(self, seconds: float | None, fire: Any, kind: str = "") -> None:
        self._disarm()
        if seconds is not None:
            self.timer = self.callLater(seconds, fire)
            self.timer_kind = kind

    def _arm_idle(self) -> None:
        seconds = self.config.ddos.idle_timeout
        if seconds is not None and self.timer_kind == "idle" and self.timer is not None and self.timer.active():
            self.timer.reset(seconds)  # moving a timer later is cheaper than a new one
            return
        self._arm(seconds, self._idle_expired, "idle")

    def _disarm_deadline(self) -> None:
        """Stop the head or body deadline. An idle timer may run on through the request: it does
        nothing unless the connection is idle, and is pushed back when the response is done."""
        if self.timer_kind != "idle":
            self._disarm()

    def _disarm(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        self.timer_kind = ""

    def _header_expired(self) -> None:
        self.timer = None
        self._timed_out("header_timeout", self.config.ddos.header_timeout)

    def _body_expired(self) -> None:
        self.timer = None
        self._timed_out("body_timeout", self.config.ddos.read_timeout)

    def _timed_out(self, reason: str, limit: float | None) -> None:
        if self.phase not in (HEAD, BODY):
            return
        events.emit("request_timeout", "warning", reason=reason, limit=limit, status=408,
                    ip_address=self._peer(), **self._what())
        self.refuse(408, f"request not received within {limit:g}s")

    def send_stalled(self) -> None:
        """The client has taken nothing of the response for `send_timeout`: cut the connection."""
        timeout = self.config.ddos.send_timeout
        events.emit("request_timeout", "warning", reason="send_timeout", limit=timeout,
                    ip_address=self._peer(), **self._what())
        self.phase = DEAD
        if self.transport is not None:
            self.transport.abortConnection()

    def _handshake_expired(self) -> None:
        self.timer = None
        events.emit("request_timeout", "info", reason="tls_handshake_timeout",
                    limit=self.config.ddos.tls_handshake_timeout, ip_address=self._peer())
        self.phase = DEAD
        if self.transport is not None:
            self.transport.abortConnection()

    def _idle_expired(self) -> None:
        self.timer = None
        self.timer_kind = ""
        self.close_if_idle()

    def close_if_idle(self) -> None:
        """Close the connection if no request is under way on it (idle timeout, or the server draining)."""
        if self.phase == HEAD and not self.pending and self.transport is not None:
            self.phase = DEAD
            self.loseConnection()
            self.linger = self.callLater(LINGER, self._abort)

    def _peer(self) -> str:
        return self.peer_host() if self.transport is not None else "-"

    _peer_address: Any = None
    _peer_host = ""

    def peer_address(self) -> Any:
        """The socket peer (or the client a PROXY protocol header named), looked up once."""
        if self._peer_address is None:
            self._peer_address = self.transport.getPeer()
            self._peer_host = canonical(getattr(self._peer_address, "host", "-"))
        return self._peer_address

    def peer_host(self) -> str:
        self.peer_address()
        return self._peer_host
