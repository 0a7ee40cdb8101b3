"""One request on a HardenedChannel, and the response to it, without twisted.web's Request.

The channel reads and checks a request whole, then makes a `ProxyRequest` and hands it to the site's
resource. The request keeps the parts of twisted.web's `Request` interface that ccproxy uses
(`requestHeaders`, `setResponseCode`, `write`, `finish`, `notifyFinish`, `registerProducer`, ...), so
a resource reads as it would for twisted.web; but the head is parsed once, and a response head goes
out in the same write as the first body bytes.
"""

from __future__ import annotations

import time
from email.utils import formatdate
from io import BytesIO
from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES
from twisted.web.http_headers import Headers

from ccproxy.http.http1 import valid_field, valid_reason, valid_written_head
from ccproxy.http.sockets import queued_bytes
from ccproxy.network.addresses import client_from_forwarded

log = Logger()

_NO_BODY = frozenset({204, 304})


class _Date:
    """The Date header value, formatted once per second rather than once per response."""

    second = -1
    value = b""

    @classmethod
    def now(cls) -> bytes:
        second = int(time.time())
        if second != cls.second:
            cls.second, cls.value = second, formatdate(second, usegmt=True).encode()
        return cls.value


class ProxyRequest:
    """One request read whole by the channel, and the response to it."""

    # Set while the request is handled: its id, the layers' context, and whether limits counted it.
    ccproxy_request_id = "-"
    ccproxy_ctx: Any = None
    ccproxy_limits_checked = False

    def __init__(self, channel: Any, method: bytes, uri: bytes, headers: Headers, body: bytes,
                 started: float) -> None:
        self.channel = channel
        self.method = method
        self.uri = uri
        self.path = uri.split(b"?", 1)[0]
        self.requestHeaders = headers
        self.responseHeaders = Headers()
        self.content = BytesIO(body)
        self.code = 200
        self.code_message = b"OK"
        self.startedWriting = False
        self.finished = False
        self._disconnected = False
        self.ccproxy_started = started
        self._chunked = False
        self._no_body = method == b"HEAD"
        self._producer: SendWatch | None = None
        self._waiters: list[defer.Deferred[None]] = []
        self._client: IAddress | None = None

    # -- what the resource reads

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
            headers.setRawHeaders(b"date", [_Date.now()])
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
        self.channel.site.log(self)
        self.ccproxy_ctx = None  # the context points back here: without this, every request is a cycle for the GC
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
        self.ccproxy_ctx = None
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
        self.timer: Any = None
        self.queued: int | None = None

    def pauseProducing(self) -> None:
        self.producer.pauseProducing()
        timeout = self.channel.config.ddos.send_timeout
        if timeout is not None and self.timer is None:
            self.queued = queued_bytes(self.channel.transport)
            self.timer = self.channel.callLater(timeout, self._expired)

    def resumeProducing(self) -> None:
        self.cancel()
        self.producer.resumeProducing()

    def stopProducing(self) -> None:
        self.cancel()
        self.producer.stopProducing()

    def cancel(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def _expired(self) -> None:
        self.timer = None
        queued = queued_bytes(self.channel.transport)
        if queued is not None and self.queued is not None and queued < self.queued:
            # Some was taken since: slow, not stalled.
            self.queued = queued
            self.timer = self.channel.callLater(self.channel.config.ddos.send_timeout, self._expired)
            return
        self.channel.send_stalled()
