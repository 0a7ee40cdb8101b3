"""The HTTP/1.1 channel with deadlines and limits that twisted.web's own channel lacks.

Every request head passes through this channel's own buffer first: it is checked whole
(`http1.parse_head`) and only then handed to twisted.web, one request at a time, so a pipelined
second request cannot slip past the checks. The phases of a connection:

  HEAD  reading a request head: `header_timeout` runs from its first byte (not reset by later
        bytes); between requests `idle_timeout` runs instead.
  BODY  twisted.web is reading the body: `read_timeout` runs; chunked bodies are counted.
  BUSY  the request is being answered: no timer at all, so a long stream is never cut. Bytes the
        client sends meanwhile wait in our buffer.
  DEAD  refused: an error went out and the connection is closing; input is ignored.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES, HTTPChannel, _ChunkedTransferDecoder, _MalformedChunkedDataError
from zope.interface import implementer

from ccproxy import events
from ccproxy.config.network import NetworkConfig
from ccproxy.errors import ApiError, error_body
from ccproxy.network.addresses import canonical
from ccproxy.network.http1 import Head, Malformed, has_bare_line_break, head_end, parse_head
from ccproxy.routes import api_for

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


class _LimitedChunkedDecoder(_ChunkedTransferDecoder):
    """Refuses a chunked body as soon as its declared chunk sizes pass the limit, before the data."""

    def __init__(self, channel: HardenedChannel, data: Any, finish: Any) -> None:
        super().__init__(data, finish)
        self.channel = channel
        self.declared = 0

    def _dataReceived_CHUNK_LENGTH(self) -> bool:
        went_on = super()._dataReceived_CHUNK_LENGTH()
        if went_on and self.state == "BODY":
            self.declared += self.length
            if not self.channel.body_received(self.declared):
                # The channel has answered 413; this stops twisted.web's decoding loop.
                raise _MalformedChunkedDataError("body over the size limit")
        return went_on


@implementer(IHandshakeListener)
class HardenedChannel(HTTPChannel):
    site: Any

    def connectionMade(self) -> None:
        # twisted's idle timer (reset by every byte) is replaced by the deadlines below.
        self.timeOut = None
        super().connectionMade()
        self.config: NetworkConfig = self.site.network()
        limits = self.config.ddos
        # Our own head check comes first; twisted.web's limits must never be the ones that trigger.
        self.MAX_LENGTH = self.totalHeadersSize = limits.max_header_size + 1024
        self.max_request_size = limits.max_request_size
        self.phase = HEAD
        self.pending = bytearray()
        self.body_left: int | None = None
        self.head: Head | None = None
        self.draining = False
        self.timer: IDelayedCall | None = None
        self.linger: IDelayedCall | None = None
        self.secure = self.isSecure()
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
        if self.phase == BODY:
            self._feed_body(data)
            return
        if self.handshaking:
            self.handshakeCompleted()
        self.pending += data
        if self.phase == BUSY:
            if len(self.pending) > PIPELINE_BUFFER:
                self._networkProducer.pauseProducing()
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
        """Hand one complete request head to twisted.web; False while the head is incomplete."""
        while self.pending.startswith(b"\r\n"):
            # RFC 9112 2.2: an empty line before a request line is ignored.
            del self.pending[:2]
        if not self.pending:
            return False
        limits = self.config.ddos
        if self.timer is None or self.timer_kind != "header":
            self._arm(limits.header_timeout, self._header_expired, "header")
        end = head_end(self.pending, limits.max_header_size)
        if end == -1:
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
        self._disarm()
        rest = bytes(self.pending[end + 4 :])
        del self.pending[:]
        self.phase = BODY
        self.body_left = None if head.chunked else (head.content_length or 0)
        if head.has_body:
            self._arm(limits.read_timeout, self._body_expired, "body")
        HTTPChannel.dataReceived(self, raw + b"\r\n\r\n")
        if self.phase == BODY and rest:
            self._feed_body(rest)
        elif rest:
            self.pending[:0] = rest
        return True

    def _feed_body(self, data: bytes) -> None:
        if self.body_left is not None:
            # A declared length: give twisted.web exactly that much; what follows is the next request.
            part, extra = data[: self.body_left], data[self.body_left :]
            self.body_left -= len(part)
            if part:
                HTTPChannel.dataReceived(self, part)
            if extra:
                self.pending += extra
                if self.phase == HEAD:
                    self._drain()
            return
        HTTPChannel.dataReceived(self, data)

    def _maybeChooseTransferDecoder(self, header: bytes, data: bytes) -> bool:
        ok: bool = super()._maybeChooseTransferDecoder(header, data)
        if ok and type(self._transferDecoder) is _ChunkedTransferDecoder:
            self._transferDecoder = _LimitedChunkedDecoder(
                self, self.requests[-1].handleContentChunk, self._finishRequestBody
            )
        return ok

    def _finishRequestBody(self, data: bytes) -> None:
        # Bytes after a chunked body's last chunk belong to the next request: keep them for our check.
        if data:
            self.pending[:0] = data
        self.allContentReceived()

    def allContentReceived(self) -> None:
        if self.phase == DEAD:
            return
        self._disarm()
        self.phase = BUSY
        super().allContentReceived()

    def body_received(self, total: int) -> bool:
        """Called by the request for each body chunk; False once the body is over the limit."""
        if self.phase == DEAD:
            return False
        if total > self.max_request_size:
            self._too_large("body_size", self.max_request_size, 413, "request body is larger than allowed")
            return False
        return True

    def requestDone(self, request: Any) -> None:
        self.head = None
        super().requestDone(request)
        gone = self.transport is None or getattr(self.transport, "disconnecting", False)
        if self.phase == DEAD or not self.persistent or gone:
            return
        self.phase = HEAD
        if self.pending:
            self._drain()
        else:
            self._arm_idle()

    def connectionLost(self, reason: Failure = _DONE) -> None:
        self._disarm()
        if self.linger is not None and self.linger.active():
            self.linger.cancel()
        self.linger = None
        if self.phase != DEAD:
            self.phase = DEAD
        super().connectionLost(reason)

    # -- refusals

    def _respondToBadRequestAndDisconnect(self) -> None:
        # twisted.web found a fault of its own (e.g. a bad chunk size): same answer as ours.
        self._invalid("malformed", "malformed request", None)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._too_large("header_size", self.config.ddos.max_header_size, 431, "request head is larger than allowed")

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
        from ccproxy.resource import new_request_id

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
            self.transport.abortConnection()  # type: ignore[attr-defined]

    # -- timers

    timer_kind = ""
    error_target = b"/"

    def _arm(self, seconds: float | None, fire: Any, kind: str = "") -> None:
        self._disarm()
        if seconds is not None:
            self.timer = self.callLater(seconds, fire)
            self.timer_kind = kind

    def _arm_idle(self) -> None:
        self._arm(self.config.ddos.idle_timeout, self._idle_expired, "idle")

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

    def _handshake_expired(self) -> None:
        self.timer = None
        events.emit("request_timeout", "info", reason="tls_handshake_timeout",
                    limit=self.config.ddos.tls_handshake_timeout, ip_address=self._peer())
        self.phase = DEAD
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def _idle_expired(self) -> None:
        self.timer = None
        if self.phase == HEAD and not self.pending and self.transport is not None:
            self.phase = DEAD
            self.loseConnection()
            self.linger = self.callLater(LINGER, self._abort)

    def _peer(self) -> str:
        peer = self.transport.getPeer() if self.transport is not None else None
        return canonical(getattr(peer, "host", "-"))
