"""One request on a HardenedChannel, and the response to it, without twisted.web's Request.

The channel reads and checks a request head, then makes a `ProxyRequest` and hands it to the site's
resource, which decides from the head alone whether to go on: only then does it ask for the body
(`read_body`), so a refused request is answered before its body is read. The request keeps the
parts of twisted.web's `Request` interface that ccproxy uses (`requestHeaders`, `setResponseCode`,
`write`, `finish`, `notifyFinish`, `registerProducer`, ...), so a resource reads as it would for
twisted.web; but the head is parsed once, and a response head goes out in the same write as the
first body bytes.
"""

from __future__ import annotations

from email.utils import formatdate
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES
from twisted.web.http_headers import Headers

from ccproxy.deadline import Deadline
from ccproxy.http.http1 import valid_field, valid_reason, valid_written_head
from ccproxy.http.sockets import queued_bytes
from ccproxy.network.addresses import client_from_forwarded

if TYPE_CHECKING:
    from ccproxy.context import RequestContext

log = Logger()

_NO_BODY = frozenset({204, 304})


class _Date:
    """The Date header value, formatted once per second rather than once per response."""

    second = -1
    value = b""

    @classmethod
    def at(cls, seconds: float) -> bytes:
        second = int(seconds)
        if second != cls.second:
            cls.second, cls.value = second, formatdate(second, usegmt=True).encode()
        return cls.value


class ProxyRequest:
    """One request read whole by the channel, and the response to it."""

    # Set while the request is handled: its id, and the layers' context (None for /health).
    request_id = "-"
    ctx: RequestContext | None = None

    def __init__(self, channel: Any, method: bytes, uri: bytes, headers: Headers, started: float,
                 body: bytes | None = b"") -> None:
        self.channel = channel
        self.method = method
        self.uri = uri
        self.path = uri.split(b"?", 1)[0]
        self.requestHeaders = headers
        self.responseHeaders = Headers()
        # None until the channel has read the body: it reads it only once `read_body` asks.
        self._body = body
        self._body_waiter: defer.Deferred[bytes] | None = None
        self.code = 200
        self.code_message = b"OK"
        self.startedWriting = False
        self.finished = False
        self._disconnected = False
        self.started = started
        self._chunked = False
        self._no_body = method == b"HEAD"
        self._producer: SendWatch | None = None
        self._waiters: list[defer.Deferred[None]] = []
        self._client: IAddress | None = None

    # -- what the resource reads

    def body_now(self) -> bytes | None:
        """Ask for the body, and return it if it is whole at once (most bodies come with their
        head); None if the rest is still to come (then `read_body`). Raises ApiError like it."""
        if self._body is None and not self._disconnected:
            self.channel.want_body(self)
        return self._body

    def read_body(self) -> defer.Deferred[bytes]:
        """The body, read now if it was not yet (and `100 Continue` sent if the client waits for it).

        Fails with ApiError when the body cannot be taken in (the process's buffer budget is
        spent), and with CancelledError when the client goes or its body is refused on the way.
        """
        if self._body is not None:
            return defer.succeed(self._body)
        if self._disconnected:
            return defer.fail(defer.CancelledError("client went away"))
        if self._body_waiter is None:
            self._body_waiter = defer.Deferred()
            waiter = self._body_waiter
            try:
                self.channel.want_body(self)
            except Exception:
                self._body_waiter = None
                return defer.fail()
            return waiter
        return self._body_waiter

    def body_arrived(self, body: bytes) -> None:
        """The channel has the whole body."""
        self._body = body
        waiter, self._body_waiter = self._body_waiter, None
        if waiter is not None:
            waiter.callback(body)

    def body_failed(self, error: Exception) -> None:
        """The channel cannot take the body in (`error` says why, to be answered)."""
        waiter, self._body_waiter = self._body_waiter, None
        if waiter is not None:
            waiter.errback(Failure(error))

    def isSecure(self) -> bool:
        return bool(self.channel.secure)

    def getClientAddress(self) -> IAddress:
        """The socket peer, or behind a trusted proxy the right-most untrusted X-Forwarded-For hop."""
        if self._client is None:
            self._client = self._find_client()
        return self._client

    def peer_host(self) -> str:
        """The address of the connection's peer, before any X-Forwarded-For."""
        return str(self.channel.peer_host())

    def _find_client(self) -> IAddress:
        peer = self.channel.peer_address()
        host = getattr(peer, "host", None)
        if host is None:
            return peer
        client = self.channel.peer_host()
        trusted = self.channel.site.trusted()
        if trusted:
            client = client_from_forwarded(host, self.requestHeaders.getRawHeaders(b"x-forwarded-for") or [], trusted)
        if client == host:
            return peer
        kind = IPv6Address if ":" in client else IPv4Address
        return kind("TCP", client, getattr(peer, "port", 0))

    # -- the response

    def setResponseCode(self, code: int, message: bytes | None = None) -> None:
        self.code = code
        self.code_message = message or RESPONSES.get(code, b"Unknown Status")

    def setHeader(self, name: bytes | str, value: bytes | str) -> None:
        self.responseHeaders.setRawHeaders(name, [value])

    def respond(self, body: bytes) -> None:
        """The whole response body at once: sent with its length, in one write with the head."""
        if not self.responseHeaders.hasHeader(b"content-length") and self.code not in _NO_BODY:
            self.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
        self.write(body)
        self.finish()

    def write(self, data: bytes) -> None:
        if self.finished or self._disconnected:
            return
        if not self.startedWriting:
            self.startedWriting = True
            self.channel.answering(self)
            head = self._head()
            if data and not self._no_body:
                head += self._framed(data)
            self.channel.transport.write(head)
            return
        if data and not self._no_body:
            self.channel.transport.write(self._framed(data))

    def _framed(self, data: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(data), data) if self._chunked else data

    def _head(self) -> bytes:
        headers = self.responseHeaders
        if self.code in _NO_BODY or self.code < 200:
            self._no_body = True
        elif not headers.hasHeader(b"content-length"):
            if self.channel.persistent:
                self._chunked = True
                headers.setRawHeaders(b"transfer-encoding", [b"chunked"])
            # Otherwise (HTTP/1.0) the end of the body is the end of the connection.
        if not headers.hasHeader(b"date"):
            headers.setRawHeaders(b"date", [_Date.at(self.channel.site.clock.seconds())])
        if not self.channel.persistent:
            headers.setRawHeaders(b"connection", [b"close"])
        lines = [b"HTTP/1.1 %d %s\r\n" % (self.code, self.code_message)]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                lines.append(b"%s: %s\r\n" % (name, value))
        lines.append(b"\r\n")
        head = b"".join(lines)
        # (header names are tokens already: twisted's Headers refuses any other)
        if 100 <= self.code <= 599 and valid_written_head(head, len(lines)):
            return head
        return self._safe_head()

    def _safe_head(self) -> bytes:
        """The head with what would break its framing left out: a status or reason phrase, a header
        name or value that the strict reader of heads refuses (a CR, LF or NUL in it)."""
        code = self.code if isinstance(self.code, int) and 100 <= self.code <= 599 else 502
        phrase = self.code_message if code == self.code and valid_reason(self.code_message) else b""
        lines = [b"HTTP/1.1 %d %s\r\n" % (code, phrase or RESPONSES.get(code, b"Unknown Status"))]
        for name, values in self.responseHeaders.getAllRawHeaders():
            for value in values:
                if valid_field(name, value):
                    lines.append(b"%s: %s\r\n" % (name, value))
                else:
                    log.warn("response header {name!r} not sent: it holds a character a header may not",
                             name=name[:64])
        lines.append(b"\r\n")
        return b"".join(lines)

    def finish(self) -> None:
        if self.finished or self._disconnected:
            return
        if not self.startedWriting:
            if not self.responseHeaders.hasHeader(b"content-length") and self.code not in _NO_BODY:
                self.responseHeaders.setRawHeaders(b"content-length", [b"0"])
            self.write(b"")
        elif self._chunked and not self._no_body:
            self.channel.transport.write(b"0\r\n\r\n")
        self.finished = True
        if self._producer is not None:
            self.unregisterProducer()
        self.channel.site.completed(self)
        self.ctx = None  # the context points back here: without this, every request is a cycle for the GC
        self.channel.requestDone(self)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def notifyFinish(self) -> defer.Deferred[None]:
        """Fires when the response is complete; fails if the client goes away first."""
        waiter: defer.Deferred[None] = defer.Deferred()
        if self.finished:
            waiter.callback(None)
        elif self._disconnected:
            waiter.errback(Failure(defer.CancelledError("client went away")))
        else:
            self._waiters.append(waiter)
        return waiter

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        # A push producer (the upstream socket) paused while the client's buffers are full.
        if self._disconnected:
            producer.stopProducing()  # nobody is left to read what it would produce
            return
        self._producer = SendWatch(producer, self.channel)
        self.channel.transport.registerProducer(self._producer, streaming)

    def unregisterProducer(self) -> None:
        if self._producer is not None:
            self._producer.cancel()
            self._producer = None
            self.channel.transport.unregisterProducer()

    def connectionLost(self, reason: Failure) -> None:
        """The client connection closed before the response was finished."""
        self._disconnected = True
        self.ctx = None
        body, self._body_waiter = self._body_waiter, None
        if body is not None:
            body.errback(Failure(defer.CancelledError("client went away")))
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(reason)


class SendWatch:
    """Stands between the client connection and the producer feeding it (the upstream socket).

    The connection pauses the producer when the client takes its bytes slower than they come. A
    client that then takes nothing at all for `send_timeout` (a slow-read attack, or a client gone
    without a FIN) would hold the connection, its buffers and an upstream connection for ever: the
    channel cuts it. A client that is slow but still reading only pushes the deadline back.
    """

    def __init__(self, producer: Any, channel: Any) -> None:
        self.producer = producer
        self.channel = channel
        self.deadline = Deadline(channel.site.clock, self._expired)
        self.queued: int | None = None

    def pauseProducing(self) -> None:
        self.producer.pauseProducing()
        timeout = self.channel.config.ddos.send_timeout
        if timeout is not None and not self.deadline.armed:
            self.queued = queued_bytes(self.channel.transport)
            self.deadline.arm(timeout)

    def resumeProducing(self) -> None:
        self.cancel()
        self.producer.resumeProducing()

    def stopProducing(self) -> None:
        self.cancel()
        self.producer.stopProducing()

    def cancel(self) -> None:
        self.deadline.cancel()

    def _expired(self) -> None:
        queued = queued_bytes(self.channel.transport)
        if queued is not None and self.queued is not None and queued < self.queued:
            # Some was taken since: slow, not stalled.
            self.queued = queued
            self.deadline.arm(self.channel.config.ddos.send_timeout)
            return
        self.channel.send_stalled()
