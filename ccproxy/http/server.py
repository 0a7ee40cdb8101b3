"""The HTTP/1.1 server side: request heads checked whole, deadlines and limits, one request at a time.

Every request is read into this channel's own buffer and its head checked whole
(`http1.parse_head`). The resource gets the request as soon as its head is complete and decides from
the head alone (addresses, credentials, limits, route) whether to go on; only then does it ask for
the body (`ProxyRequest.read_body`), which is read whole (declared length, or chunked with
`http1.ChunkedDecoder`) before it is handed on, so a pipelined second request cannot slip past the
checks, and a refused request is answered before a byte of its body is read. The phases of a
connection:

  HEAD     reading a request head: `header_timeout` runs from its first byte (not reset by later
           bytes); between requests `idle_timeout` runs instead.
  WAIT     the head is with the resource, which has not asked for the body yet: reading stops (no
           `100 Continue` either) until it does.
  BODY     reading the body: `read_timeout` runs; its size is counted as it arrives, against the
           request's limit and the process-wide buffer budget.
  BUSY     the request is being answered: no deadline, so a long stream is never cut (the idle
           timer may run on, but acts only on an idle connection). Bytes the client sends
           meanwhile wait in our buffer.
  DISCARD  the request was answered without its body: a small declared body is read and dropped
           so the connection can carry the next request; anything larger closes it instead.
  DEAD     refused: an error went out and the connection is closing; input is ignored.
"""
from __future__ import annotations

from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHandshakeListener, ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES
from zope.interface import implementer

from ccproxy import events
from ccproxy._compat import checked_headers
from ccproxy.config.network import NetworkConfig
from ccproxy.context import new_request_id
from ccproxy.deadline import Deadline
from ccproxy.errors import ApiError, error_body
from ccproxy.http.http1 import (
    ChunkedDecoder,
    Head,
    HeadScan,
    Malformed,
    TooLarge,
    parse_head,
)
from ccproxy.http.request import ProxyRequest
from ccproxy.network.addresses import canonical
from ccproxy.routes import api_for

log = Logger()

HEAD, WAIT, BODY, BUSY, DISCARD, DEAD = "head", "wait", "body", "busy", "discard", "dead"
# Bytes a client may send ahead while a request is being answered, before we stop reading.
PIPELINE_BUFFER = 64 * 1024
# A request answered without reading its body keeps its connection if at most this much of the body
# is still to come (read and dropped); past it, or for a chunked body, the connection is closed.
DISCARD_LIMIT = 64 * 1024
# After an error response, how long the client gets to read it before the connection is cut.
LINGER = 2.0
_DONE = Failure(ConnectionDone())


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
        # Requests answered on this connection: a drain waits briefly for a new connection's first.
        self.served = 0
        self.persistent = True
        self.scan = HeadScan(limits.max_header_size)
        # The body as it arrives: one buffer, so a body costs about its size however it is framed.
        self.body = bytearray()
        self.body_left = 0
        self.chunks: ChunkedDecoder | None = None
        # Bytes of the process-wide buffer budget this connection's current body holds.
        self.reserved = 0
        self.draining = False
        self.paused = False
        # The connection's one deadline (handshake, header, body or idle: `timer_kind`), and after a
        # refusal, how long the client has to read it.
        self.deadline = Deadline(self.site.clock, self._deadline_passed)
        self.on_deadline: Any = None
        self.linger = Deadline(self.site.clock, self._abort)
        self.secure = ISSLTransport.providedBy(self.transport)
        self.handshaking = self.secure and limits.tls_handshake_timeout is not None
        if self.handshaking:
            self._arm(limits.tls_handshake_timeout, self._handshake_expired)
        else:
            self._arm_idle()

    def handshakeCompleted(self) -> None:
        if self.handshaking:
            self.handshaking = False
            if self.phase == HEAD and not self.pending:
                self._arm_idle()

    # -- input

    def dataReceived(self, data: bytes) -> None:
        if self.phase == DEAD:
            return
        if self.handshaking:
            self.handshakeCompleted()
        self.pending += data
        if self.phase == BODY:
            self._feed_body()
            return
        if self.phase == DISCARD:
            self._discard()
            return
        if self.phase in (BUSY, WAIT):
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
        removed = 0
        while self.pending.startswith(b"\r\n"):
            # RFC 9112 2.2: an empty line before a request line is ignored.
            del self.pending[:2]
            removed += 2
        if removed:
            self.scan.forget(removed)
        if not self.pending:
            return False
        limits = self.config.ddos
        try:
            end = self.scan.find(self.pending)
        except Malformed as e:
            self._invalid(e.reason, e.message, None)
            return False
        if end == -1:
            if self.timer_kind != "header":
                self._arm(limits.header_timeout, self._header_expired, "header")
            return False
        if end == -2:
            self._too_large("header_size", limits.max_header_size, 431, "request head is larger than allowed")
            return False
        raw = bytes(memoryview(self.pending)[:end])
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
        # Taking bytes off the front of a bytearray is cheap: pipelined requests are not copied.
        del self.pending[: end + 4]
        self.scan.forget(end + 4)
        self.persistent = head.persistent
        self.phase = WAIT if head.has_body else BUSY
        self._dispatch(head)
        if self.phase == WAIT and not self.paused:
            # The decision from the head is still under way: read nothing more until it is made.
            self.paused = True
            self.transport.pauseProducing()
        return True

    def want_body(self, request: ProxyRequest) -> None:
        """The resource has decided from the head: read the body now (ProxyRequest.read_body).

        Raises ApiError (503) when the process's buffer budget cannot take a body of the declared
        length: nothing of it is read.
        """
        head = self.head
        if request is not self.request or self.phase != WAIT or head is None:
            return
        limits = self.config.ddos
        if not self._reserve(head.content_length or 0):
            raise self._overloaded()
        self.phase = BODY
        self.body = bytearray()
        self.body_left = head.content_length or 0
        self.chunks = ChunkedDecoder(limits.max_request_size) if head.chunked else None
        if head.expect_continue and not self.pending:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if self.paused:
            self.paused = False
            self.transport.resumeProducing()
        if self.pending:
            self._feed_body()
        if self.phase == BODY and self.request is request:
            # Armed only for a body still to come: most arrive with their head.
            self._arm(limits.read_timeout, self._body_expired, "body")

    def _reserve(self, size: int) -> bool:
        if not self.site.budget.acquire(size):
            return False
        self.reserved += size
        return True

    def _release(self) -> None:
        if self.reserved:
            self.site.budget.release(self.reserved)
            self.reserved = 0

    def _overloaded(self) -> ApiError:
        limit = self.site.budget.limit()
        events.emit("server_overloaded", "warning", reason="max_buffered_bytes", limit=limit,
                    ip_address=self._peer(), **self._what())
        return ApiError(503, "ccproxy is holding as many request bodies as it may; retry shortly",
                        headers={"retry-after": "1"})

    def _feed_body(self) -> None:
        """Move body bytes from the input buffer to the body; what follows the body stays there."""
        pending = self.pending
        if self.chunks is not None:
            self._feed_chunked(self.chunks)
            return
        # A declared length: exactly that much is the body; what follows is the next request.
        take = min(self.body_left, len(pending))
        if take == self.body_left and not self.body:
            body = bytes(memoryview(pending)[:take])  # the whole body at once, the common case: one copy
        else:
            self.body += memoryview(pending)[:take]
            body = b""
        del pending[:take]
        self.body_left -= take
        if self.body_left == 0:
            self._body_done(body or bytes(self.body))

    def _feed_chunked(self, chunks: ChunkedDecoder) -> None:
        before = chunks.declared
        try:
            used = chunks.feed_into(self.pending, self.body)
        except TooLarge:
            self._too_large("body_size", self.max_request_size, 413, "request body is larger than allowed")
            return
        except Malformed as e:
            self._invalid(e.reason, e.message, None)
            return
        del self.pending[:used]
        # A chunked body's size is known only as its chunks declare it: the budget is taken chunk by
        # chunk (what one read brought in may be past it by then, no more).
        if chunks.declared > before and not self._reserve(chunks.declared - before):
            self._body_failed(self._overloaded())
            return
        if chunks.done:
            self.chunks = None
            self._body_done(bytes(self.body))

    def _body_done(self, body: bytes) -> None:
        self._disarm_deadline()
        self.phase = BUSY
        self.body = bytearray()
        request = self.request
        if request is not None:
            request.body_arrived(body)

    def _body_failed(self, error: ApiError) -> None:
        """The body cannot be taken in: the resource answers (and the connection closes after)."""
        self._disarm_deadline()
        self.phase = BUSY
        self.body = bytearray()
        self.persistent = False
        request = self.request
        if request is not None:
            request.body_failed(error)

    def _dispatch(self, head: Head) -> None:
        """The head is whole and sound: hand the request to the resource, which asks for its body."""
        if self.site.draining:
            self.persistent = False  # the server is shutting down: `Connection: close` on this response
        headers = checked_headers(head.headers)  # every field line passed http1's checks
        request = ProxyRequest(self, head.method, head.target, headers, self.site.clock.seconds(),
                               None if head.has_body else b"")
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
        if request.head_sent:
            self.transport.abortConnection()
            return
        self.refuse(500, "internal proxy error")

    def answering(self, request: ProxyRequest) -> None:
        """A response head is about to go out: if the body was not read, whether the connection can
        still carry another request (said in the head with `Connection: close` when not)."""
        head = self.head
        if request is not self.request or head is None:
            return
        if self.phase == BODY:
            self.persistent = False
        elif self.phase == WAIT:
            # A client waiting for `100 Continue` may or may not send its body now: only a close is clear.
            to_come = (head.content_length or 0) - len(self.pending)
            if head.chunked or head.expect_continue or to_come > DISCARD_LIMIT:
                self.persistent = False

    def request_done(self, request: ProxyRequest) -> None:
        """The response is complete: read the next request, or close."""
        if request is not self.request:
            return
        self.request = None
        self.served += 1
        head, self.head = self.head, None
        self._release()
        if self.phase == DEAD or self.transport is None:
            return
        unread = self.phase in (WAIT, BODY)
        if not self.persistent or self.site.draining or getattr(self.transport, "disconnecting", False):
            self.phase = DEAD
            self.transport.loseConnection()
            if unread:
                # The client may still be sending the body it was never asked for; it gets a while
                # to read the answer, then the connection is cut.
                self.linger.arm(LINGER)
            return
        if self.phase == WAIT and head is not None:
            self.phase = DISCARD
            self.body_left = head.content_length or 0
            self._arm(self.config.ddos.read_timeout, self._body_expired, "body")
            self._discard()
            return
        self._next()

    def _discard(self) -> None:
        """Drop the body of a request answered without it; then go on to the next request."""
        take = min(self.body_left, len(self.pending))
        del self.pending[:take]
        self.body_left -= take
        if self.body_left:
            if self.paused:
                self.paused = False
                self.transport.resumeProducing()
            return
        self._disarm()
        self._next()

    def _next(self) -> None:
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
        self._release()
        self.linger.cancel()
        self.phase = DEAD
        request, self.request = self.request, None
        if request is not None and not request.finished:
            request.connection_lost(reason)

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
        self._release()
        self.body = bytearray()
        self.pending.clear()
        request = self.request
        if request is not None and not request.finished:
            # The channel answers for it: the resource must not write, and stops waiting for a body.
            request.connection_lost(Failure(ConnectionDone("request refused by the server side")))
        target = self.head.target if self.head is not None else self.error_target
        body = error_body(api_for(target), ApiError(status, message))
        lines = [b"HTTP/1.1 %d %s" % (status, RESPONSES.get(status, b"Error"))]
        headers = [
            (b"Content-Type", b"application/json"),
            (b"Content-Length", str(len(body)).encode()),
            (b"request-id", new_request_id().encode()),
            (b"Connection", b"close"),
            (b"Server", b"ccproxy"),
            *self.config.security_headers.lines(self.secure),
        ]
        lines += [name + b": " + value for name, value in headers]
        self.transport.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        self.loseConnection()
        # A client that never reads would keep the connection (and its buffers) forever.
        self.linger.arm(LINGER)

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()

    # -- timers

    timer_kind = ""
    error_target = b"/"

    def _arm(self, seconds: float | None, fire: Any, kind: str = "") -> None:
        if seconds is None:
            self._disarm()
            return
        self.on_deadline, self.timer_kind = fire, kind
        self.deadline.arm(seconds)

    def _arm_idle(self) -> None:
        self._arm(self.config.ddos.idle_timeout, self._idle_expired, "idle")

    def _disarm_deadline(self) -> None:
        """Stop the head or body deadline. An idle timer may run on through the request: it does
        nothing unless the connection is idle, and is pushed back when the response is done."""
        if self.timer_kind != "idle":
            self._disarm()

    def _disarm(self) -> None:
        self.deadline.cancel()
        self.on_deadline, self.timer_kind = None, ""

    def _deadline_passed(self) -> None:
        fire, self.on_deadline = self.on_deadline, None
        if fire is not None:
            fire()

    def _header_expired(self) -> None:
        self._timed_out("header_timeout", self.config.ddos.header_timeout)

    def _body_expired(self) -> None:
        self._timed_out("body_timeout", self.config.ddos.read_timeout)

    def _timed_out(self, reason: str, limit: float | None) -> None:
        if self.phase == DISCARD:
            # The answer is out; a body that stops coming only loses the connection.
            self.phase = DEAD
            self._abort()
            return
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
        events.emit("request_timeout", "info", reason="tls_handshake_timeout",
                    limit=self.config.ddos.tls_handshake_timeout, ip_address=self._peer())
        self.phase = DEAD
        if self.transport is not None:
            self.transport.abortConnection()

    def _idle_expired(self) -> None:
        self.timer_kind = ""
        self.close_if_idle()

    def close_if_idle(self) -> None:
        """Close the connection if no request is under way on it (idle timeout, or the server draining)."""
        if self.phase == HEAD and not self.pending and self.transport is not None:
            self.phase = DEAD
            self.loseConnection()
            self.linger.arm(LINGER)

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
