"""One request on a HardenedChannel, and the response to it, without twisted.web's Request.

The channel reads and checks a request head, then makes a `ProxyRequest` and hands it to the site's
resource, which decides from the head alone whether to go on: only then does it ask for the body
(`read_body`), so a refused request is answered before its body is read. The request is a small
response writer with names of its own (`set_status`, `set_header`, `respond`, `when_finished`, ...):
the head is parsed once, and a response head goes out in the same write as the first body bytes.
The only camelCase names left are those of Twisted interfaces: `IConsumer` on the request
(`registerProducer`, `unregisterProducer`, with `write`: the upstream socket is attached through
them), and `IPushProducer` on `SendWatch` (the client's transport calls those).
"""

from __future__ import annotations

from email.utils import formatdate
from typing import TYPE_CHECKING, Protocol, cast

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IConsumer, IProducer, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES
from twisted.web.http_headers import Headers
from zope.interface import implementer

from ccproxy.deadline import Deadline
from ccproxy.http.http1 import valid_field, valid_reason, valid_written_head
from ccproxy.http.sockets import queued_bytes
from ccproxy.network.addresses import NetworkSet, client_from_forwarded

if TYPE_CHECKING:
    from ccproxy.config.network import NetworkConfig
    from ccproxy.context import RequestContext

log = Logger()

_NO_BODY = frozenset({204, 304})


class Transport(Protocol):
    """What a request writes to: the client connection's transport."""

    def write(self, data: bytes) -> None: ...

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None: ...

    def unregisterProducer(self) -> None: ...

    def abortConnection(self) -> None: ...


class Site(Protocol):
    """What a request needs of the site that made its channel."""

    @property
    def clock(self) -> IReactorTime: ...

    def trusted(self) -> NetworkSet: ...

    def completed(self, request: ProxyRequest) -> None: ...


class Channel(Protocol):
    """What a request needs of the connection it came on (`ccproxy.http.server.HardenedChannel`)."""

    @property
    def transport(self) -> Transport: ...

    @property
    def site(self) -> Site: ...

    @property
    def config(self) -> NetworkConfig: ...

    @property
    def secure(self) -> bool: ...

    @property
    def persistent(self) -> bool: ...

    def peer_address(self) -> IAddress: ...

    def peer_host(self) -> str: ...

    def want_body(self, request: ProxyRequest) -> None: ...

    def answering(self, request: ProxyRequest) -> None: ...

    def request_done(self, request: ProxyRequest) -> None: ...

    def send_stalled(self) -> None: ...


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


@implementer(IConsumer)
class ProxyRequest:
    """One request read whole by the channel, and the response to it.

    What the resource and the layers use: `method`, `target` (the request-target as sent), `path`
    (without the query), `request_headers` (as the client sent them), `started`, `request_id`,
    `ctx`; `body_now`/`read_body`; `is_secure`, `client_address`, `peer_host`; the response:
    `set_status` (`status`, `phrase`), `set_header`/`response_headers`, `respond`, `write`,
    `finish`, `head_sent`, `finished`, `when_finished`, `abort`, and the producer pair.
    The channel calls `body_arrived`, `body_failed` and `connection_lost`.
    """

    # Set while the request is handled: its id, and the layers' context (None for /health).
    request_id = "-"
    ctx: RequestContext | None = None

    def __init__(self, channel: Channel, method: bytes, target: bytes, headers: Headers, started: float,
                 body: bytes | None = b"") -> None:
        self._channel = channel
        self.method = method
        self.target = target
        self.path = target.split(b"?", 1)[0]
        self.request_headers = headers
        self.response_headers = Headers()
        # None until the channel has read the body: it reads it only once `read_body` asks.
        self._body = body
        self._body_waiter: defer.Deferred[bytes] | None = None
        self.status = 200
        self.phrase = b"OK"
        self.head_sent = False
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
            self._channel.want_body(self)
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
                self._channel.want_body(self)
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

    def is_secure(self) -> bool:
        return bool(self._channel.secure)

    def client_address(self) -> IAddress:
        """The socket peer, or behind a trusted proxy the right-most untrusted X-Forwarded-For hop."""
        if self._client is None:
            self._client = self._find_client()
        return self._client

    def peer_host(self) -> str:
        """The address of the connection's peer, before any X-Forwarded-For."""
        return str(self._channel.peer_host())

    def _find_client(self) -> IAddress:
        peer = self._channel.peer_address()
        host = getattr(peer, "host", None)
        if host is None:
            return peer
        client = self._channel.peer_host()
        trusted = self._channel.site.trusted()
        if trusted:
            client = client_from_forwarded(host, self.request_headers.getRawHeaders(b"x-forwarded-for") or [], trusted)
        if client == host:
            return peer
        kind = IPv6Address if ":" in client else IPv4Address
        return kind("TCP", client, getattr(peer, "port", 0))

    # -- the response

    def set_status(self, code: int, phrase: bytes | None = None) -> None:
        self.status = code
        self.phrase = phrase or RESPONSES.get(code, b"Unknown Status")

    def set_header(self, name: bytes | str, value: bytes | str) -> None:
        self.response_headers.setRawHeaders(name, [value])

    def respond(self, body: bytes) -> None:
        """The whole response body at once: sent with its length, in one write with the head."""
        if not self.response_headers.hasHeader(b"content-length") and self.status not in _NO_BODY:
            self.response_headers.setRawHeaders(b"content-length", [b"%d" % len(body)])
        self.write(body)
        self.finish()

    def write(self, data: bytes) -> None:
        # IConsumer.write: the producer registered here may be driven by Twisted.
        if self.finished or self._disconnected:
            return
        if not self.head_sent:
            self.head_sent = True
            self._channel.answering(self)
            head = self._head()
            if data and not self._no_body:
                head += self._framed(data)
            self._channel.transport.write(head)
            return
        if data and not self._no_body:
            self._channel.transport.write(self._framed(data))

    def _framed(self, data: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(data), data) if self._chunked else data

    def _head(self) -> bytes:
        headers = self.response_headers
        if self.status in _NO_BODY or self.status < 200:
            self._no_body = True
        elif not headers.hasHeader(b"content-length"):
            if self._channel.persistent:
                self._chunked = True
                headers.setRawHeaders(b"transfer-encoding", [b"chunked"])
            # Otherwise (HTTP/1.0) the end of the body is the end of the connection.
        if not headers.hasHeader(b"date"):
            headers.setRawHeaders(b"date", [_Date.at(self._channel.site.clock.seconds())])
        if not self._channel.persistent:
            headers.setRawHeaders(b"connection", [b"close"])
        lines = [b"HTTP/1.1 %d %s\r\n" % (self.status, self.phrase)]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                lines.append(b"%s: %s\r\n" % (name, value))
        lines.append(b"\r\n")
        head = b"".join(lines)
        # (header names are tokens already: twisted's Headers refuses any other)
        if 100 <= self.status <= 599 and valid_written_head(head, len(lines)):
            return head
        return self._safe_head()

    def _safe_head(self) -> bytes:
        """The head with what would break its framing left out: a status or reason phrase, a header
        name or value that the strict reader of heads refuses (a CR, LF or NUL in it)."""
        code = self.status if isinstance(self.status, int) and 100 <= self.status <= 599 else 502
        phrase = self.phrase if code == self.status and valid_reason(self.phrase) else b""
        lines = [b"HTTP/1.1 %d %s\r\n" % (code, phrase or RESPONSES.get(code, b"Unknown Status"))]
        for name, values in self.response_headers.getAllRawHeaders():
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
        if not self.head_sent:
            if not self.response_headers.hasHeader(b"content-length") and self.status not in _NO_BODY:
                self.response_headers.setRawHeaders(b"content-length", [b"0"])
            self.write(b"")
        elif self._chunked and not self._no_body:
            self._channel.transport.write(b"0\r\n\r\n")
        self.finished = True
        if self._producer is not None:
            self.unregisterProducer()
        self._channel.site.completed(self)
        self.ctx = None  # the context points back here: without this, every request is a cycle for the GC
        self._channel.request_done(self)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def when_finished(self) -> defer.Deferred[None]:
        """Fires when the response is complete; fails if the client goes away first."""
        waiter: defer.Deferred[None] = defer.Deferred()
        if self.finished:
            waiter.callback(None)
        elif self._disconnected:
            waiter.errback(Failure(defer.CancelledError("client went away")))
        else:
            self._waiters.append(waiter)
        return waiter

    def abort(self) -> None:
        """Drop the client connection: a reply that cannot be completed must not look complete."""
        transport = self._channel.transport
        if transport is not None:
            transport.abortConnection()

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        # IConsumer: a push producer (the upstream socket) paused while the client's buffers are full.
        # Only push producers are registered here (the relay's upstream transport).
        if self._disconnected:
            producer.stopProducing()  # nobody is left to read what it would produce
            return
        self._producer = SendWatch(cast(IPushProducer, producer), self._channel)
        self._channel.transport.registerProducer(self._producer, streaming)

    def unregisterProducer(self) -> None:
        # IConsumer.
        if self._producer is not None:
            self._producer.cancel()
            self._producer = None
            self._channel.transport.unregisterProducer()

    def connection_lost(self, reason: Failure) -> None:
        """The client connection closed before the response was finished."""
        self._disconnected = True
        self.ctx = None
        body, self._body_waiter = self._body_waiter, None
        if body is not None:
            body.errback(Failure(defer.CancelledError("client went away")))
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(reason)


@implementer(IPushProducer)
class SendWatch:
    """Stands between the client connection and the producer feeding it (the upstream socket).

    The connection pauses the producer when the client takes its bytes slower than they come. A
    client that then takes nothing at all for `send_timeout` (a slow-read attack, or a client gone
    without a FIN) would hold the connection, its buffers and an upstream connection for ever: the
    channel cuts it. A client that is slow but still reading only pushes the deadline back.
    """

    def __init__(self, producer: IPushProducer, channel: Channel) -> None:
        self.producer = producer
        self.channel = channel
        self.deadline = Deadline(channel.site.clock, self._expired)
        self.queued: int | None = None

    # IPushProducer: the client's transport calls these three.

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
