"""A lean HTTP/1.1 client for the upstream hop, with a pool of persistent connections.

Twisted's Agent spends most of a small request's time in machinery a proxy does not need (a state
machine per request, a line parser per header, a Response object per body). This client writes a
request in one call, parses a response head in one pass, and hands the body to the same kind of
protocol `IResponse.deliverBody` takes, so the relay works with either.

Each connection is an explicit state machine (`State`) and keeps the lifecycle rules Twisted's own
client learnt the hard way: a connection goes back to the pool only reading (never paused by the
last reader's back-pressure), with the last body's producer detached; any byte on an idle connection
closes it; it is not reused after a response that was framed two ways (Transfer-Encoding with
Content-Length), followed a 1xx, or came from HTTP/1.0 without keep-alive.
"""

from __future__ import annotations

import enum
from collections.abc import Hashable, Iterable, Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from ccproxy._compat import checked_headers
from ccproxy.http.http1 import (
    CHUNKED,
    LENGTH,
    MAX_INFORMATIONAL,
    NO_BODY,
    UNTIL_CLOSE,
    ChunkedDecoder,
    Malformed,
    TooLarge,
    parse_response_head,
)
from ccproxy.http.sockets import no_delay, send_now

log = Logger()

MAX_HEAD = 256 * 1024
_RETRYABLE = frozenset({b"GET", b"HEAD", b"OPTIONS"})
# Shared: a body that ended well needs no Failure of its own (nothing reads a traceback from it).
_DONE = Failure(ResponseDone())

# Request header fields as (name, values) pairs, the shape of Headers.getAllRawHeaders().
Fields = Iterable[tuple[bytes, Sequence[bytes]]]
# What identifies the connections that can serve a request: scheme, host, port and settings.
PoolKey = Hashable


class UpstreamProtocolError(Exception):
    """The upstream answered with something that is not HTTP/1.1 as ccproxy reads it."""


def protocol_error(failure: BaseException) -> UpstreamProtocolError | None:
    """The protocol fault behind a failed request, if that is why it failed."""
    for reason in getattr(failure, "reasons", None) or ():
        if isinstance(reason.value, UpstreamProtocolError):
            return reason.value
    return None


class UpstreamResponse:
    """The head of an upstream response; `deliverBody` streams the body to a protocol."""

    def __init__(self, conn: _Connection, version: bytes, code: int, phrase: bytes, headers: Headers,
                 length: int | object) -> None:
        self._conn: _Connection | None = conn
        self.version = (b"HTTP", 1, int(version))
        self.code = code
        self.phrase = phrase
        self.headers = headers
        self.length = length

    def deliverBody(self, protocol: Protocol) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            # Once only: by a second call the connection may be carrying another response.
            raise RuntimeError("the body of a response is delivered once")
        conn.deliver_body(protocol)


class State(enum.Enum):
    """Where a connection is in its exchange; every event is handled according to it."""

    IDLE = "idle"  # in the pool (or just connected), no request on it
    SENDING = "sending"  # the request is being written
    AWAITING_HEAD = "awaiting head"  # written; the response head is not complete yet
    READING_BODY = "reading body"  # the head is out; the body is read (or held for its reader)
    DEAD = "dead"  # closed, closing, or not to be trusted again: never reused


IDLE, SENDING, AWAITING_HEAD, READING_BODY, DEAD = State


class _BodyProducer:
    """What the body protocol sees as its transport: pausing it pauses the upstream socket.

    It is detached when the body ends: the reader (and the client connection it registered this
    producer with) may still pause or stop it afterwards, and that must not reach a connection
    that is back in the pool or already carrying another request.
    """

    def __init__(self, conn: _Connection) -> None:
        self._conn: _Connection | None = conn

    def detach(self) -> None:
        self._conn = None

    def pauseProducing(self) -> None:
        if self._conn is not None:
            self._conn.pause()

    def resumeProducing(self) -> None:
        if self._conn is not None:
            self._conn.resume()

    def stopProducing(self) -> None:
        if self._conn is not None:
            self._conn.abort()


class _Connection(Protocol):
    """One upstream connection, carrying one request at a time, as an explicit state machine."""

    def __init__(self, pool: UpstreamPool, key: PoolKey) -> None:
        self.pool = pool
        self.key = key
        self.state = IDLE
        self._paused = False
        self._reset()

    def connectionMade(self) -> None:
        no_delay(self.transport)

    def _reset(self) -> None:
        # The head as it arrives, and how far it has been searched for its end (each byte once).
        self._buffer: bytes | bytearray = b""
        self._scanned = 0
        self._waiting: defer.Deferred[UpstreamResponse] | None = None
        self._method = b""
        self._body: Protocol | None = None
        self._producer: _BodyProducer | None = None
        self._pending: list[bytes] = []
        self._framing = ""
        self._remaining = 0
        self._chunks: ChunkedDecoder | None = None
        self._keep_alive = False
        self._informational = 0
        self._finished = False
        # How the body ended, kept until a body protocol is there to be told.
        self._outcome: Failure | None = None

    # Requests

    def send(
        self, method: bytes, path: bytes, headers: Fields, body: bytes | None
    ) -> defer.Deferred[UpstreamResponse]:
        if self.state is not IDLE:
            busy = UpstreamProtocolError(f"connection is {self.state.value}")
            return defer.fail(ResponseNeverReceived([Failure(busy)]))
        self._reset()
        self.state = SENDING
        self._method = method
        self._waiting = defer.Deferred(self._cancel)
        lines = [b"%s %s HTTP/1.1\r\n" % (method, path)]
        for name, values in headers:
            for value in values:
                lines.append(b"%s: %s\r\n" % (name, value))
        if body is not None:
            lines.append(b"Content-Length: %d\r\n" % len(body))
        lines.append(b"\r\n")
        if body:
            lines.append(body)
        assert self.transport is not None
        send_now(self.transport, b"".join(lines))
        if self.state is SENDING:  # (a write may have failed and closed it meanwhile)
            self.state = AWAITING_HEAD
        return self._waiting

    def _cancel(self, _: defer.Deferred[UpstreamResponse]) -> None:
        self._waiting = None  # the Deferred fails with CancelledError by itself
        self.abort()

    def abort(self) -> None:
        if self.state is not DEAD:
            self._die()
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def _die(self) -> None:
        self.state = DEAD
        self.pool.forget(self)
        if self._producer is not None:
            self._producer.detach()
            self._producer = None

    # Back-pressure from the reader of the body

    def pause(self) -> None:
        if self.state is READING_BODY and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resume(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    # Responses

    def dataReceived(self, data: bytes) -> None:
        state = self.state
        if state is READING_BODY:
            self._body_data(data)
        elif state is AWAITING_HEAD or state is SENDING:
            if self._buffer:
                self._buffer += data
            elif self._head_in_one_read(data):
                return
            else:
                self._buffer = bytearray(data)
            self._parse_head()
        elif state is IDLE:
            # Nothing was asked: whatever this is (a late part of the last response, an error page,
            # an attack), the connection can no longer be read in step with its requests.
            log.warn("upstream sent {n} bytes on an idle connection; it is closed", n=len(data))
            self.abort()

    def _head_in_one_read(self, data: bytes) -> bool:
        """The usual case, a whole head in the first read: taken without copying it into the
        buffer. False (nothing done) when the read holds no whole head."""
        end = data.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
        if end < 0:
            return False
        try:
            response = self._read_head(data[:end])
        except UpstreamProtocolError as e:
            self._fail_head(e)
            return True
        if response is None:  # an informational 1xx: the real head follows
            self._buffer = bytearray(memoryview(data)[end + 4 :])
            self._parse_head()
        else:
            self._deliver_head(response, data[end + 4 :])
        return True

    def _deliver_head(self, response: UpstreamResponse, rest: bytes) -> None:
        waiting, self._waiting = self._waiting, None
        assert waiting is not None
        self.state = READING_BODY
        # The body bytes that came with the head are taken in first (held until deliverBody):
        # a small response is then whole when its reader arrives, and needs no waiting.
        if rest:
            self._body_data(rest)
        elif self._framing == NO_BODY or (self._framing == LENGTH and self._remaining == 0):
            self._body_data(b"")
        waiting.callback(response)

    def _parse_head(self) -> None:
        while self._waiting is not None:
            end = self._buffer.find(b"\r\n\r\n", max(0, self._scanned - 3), MAX_HEAD + 4)
            if end < 0:
                self._scanned = len(self._buffer)
                if len(self._buffer) >= MAX_HEAD + 4:
                    self._fail_head(UpstreamProtocolError("response head too large"))
                return
            buffer = self._buffer
            assert isinstance(buffer, bytearray)
            head = bytes(buffer[:end])
            del buffer[: end + 4]
            self._scanned = 0
            try:
                response = self._read_head(head)
            except UpstreamProtocolError as e:
                self._fail_head(e)
                return
            if response is None:  # an informational 1xx: the real head follows
                continue
            rest, self._buffer = bytes(self._buffer), b""
            self._deliver_head(response, rest)

    def _read_head(self, head: bytes) -> UpstreamResponse | None:
        try:
            parsed = parse_response_head(head, self._method)
        except Malformed as e:
            raise UpstreamProtocolError(f"invalid response head ({e.reason}): {e.message}") from None
        if parsed.informational:
            self._informational += 1
            if self._informational > MAX_INFORMATIONAL:
                raise UpstreamProtocolError("too many informational responses")
            return None
        # After a 1xx the connection is not reused: how the two heads were framed is one more
        # thing two parsers could disagree on.
        self._keep_alive = parsed.persistent and not self._informational
        self._framing = parsed.framing
        if parsed.framing == CHUNKED:
            # The same strict reader as for request bodies; an upstream body has no size limit here.
            self._chunks = ChunkedDecoder(limit=2**64)
        elif parsed.framing == LENGTH:
            assert parsed.length is not None
            self._remaining = parsed.length
        headers = checked_headers(parsed.headers)  # every field line passed http1's checks
        length: int | object = UNKNOWN_LENGTH if parsed.length is None else parsed.length
        return UpstreamResponse(self, parsed.version[-1:], parsed.code, parsed.phrase, headers, length)

    def _fail_head(self, error: Exception) -> None:
        waiting, self._waiting = self._waiting, None
        self.abort()
        if waiting is not None:
            waiting.errback(Failure(ResponseFailed([Failure(error)])))

    # Bodies

    def deliver_body(self, protocol: Protocol) -> None:
        self._body = protocol
        self._producer = _BodyProducer(self)
        protocol.makeConnection(self._producer)  # type: ignore[arg-type,unused-ignore]
        pending, self._pending = self._pending, []
        for data in pending:
            protocol.dataReceived(data)
        if self._outcome is not None:
            outcome, self._outcome = self._outcome, None
            self._end(outcome)

    def _emit(self, data: bytes) -> None:
        if not data:
            return
        if self._body is not None:
            self._body.dataReceived(data)
        else:
            self._pending.append(data)

    def _body_data(self, data: bytes) -> None:
        if self._finished:
            # Bytes past the end of a body not yet handed to its reader.
            self._keep_alive = self._keep_alive and not data
            return
        if self._framing == LENGTH:
            take = data[: self._remaining]
            self._remaining -= len(take)
            self._emit(take)
            if self._remaining == 0:
                self._complete(extra=len(data) > len(take))
        elif self._framing == CHUNKED:
            self._chunked(data)
        elif self._framing == UNTIL_CLOSE:
            self._emit(data)
        else:
            self._complete(extra=bool(data))

    def _chunked(self, data: bytes) -> None:
        assert self._chunks is not None
        try:
            pieces = self._chunks.feed(data)
        except (Malformed, TooLarge) as e:
            self._protocol_error(f"bad chunked framing: {e}")
            return
        for piece in pieces:
            self._emit(piece)
        if self._chunks.done:
            self._complete(extra=bool(self._chunks.rest))

    def _protocol_error(self, message: str) -> None:
        self._finished = True
        self.abort()
        self._end(Failure(ResponseFailed([Failure(UpstreamProtocolError(message))])))

    def _complete(self, extra: bool) -> None:
        self._finished = True
        if extra:
            self._keep_alive = False  # bytes past the end: the connection cannot be trusted again
        self._end(_DONE)

    def _end(self, reason: Failure) -> None:
        """The body is over: tell its reader, after the connection is pooled again or closed."""
        if self._body is None:
            if self._outcome is None:
                self._outcome = reason
            return
        body, self._body = self._body, None
        self._finished = True
        if self._producer is not None:
            self._producer.detach()
            self._producer = None
        reusable = isinstance(reason.value, ResponseDone) and self._keep_alive and self.state is READING_BODY
        if reusable:
            # A connection paused by the reader's back-pressure as its body ended would stall the
            # next request on it: it goes back to the pool reading.
            if self._paused:
                self.resume()
            self.state = IDLE
            self.pool.release(self)
        elif self.state is not DEAD:
            self._die()
            if self.transport is not None:
                self.transport.loseConnection()
        body.connectionLost(reason)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        if self.state is not DEAD:
            self._die()
        self.pool.forget(self)
        if self._waiting is not None:
            waiting, self._waiting = self._waiting, None
            waiting.errback(Failure(ResponseNeverReceived([reason])))
        elif not self._finished and self._framing:
            if self._framing == UNTIL_CLOSE:
                self._end(Failure(PotentialDataLoss()))
            else:
                self._end(Failure(ResponseFailed([reason])))


class UpstreamPool:
    """Idle persistent connections per upstream address, closed after `idle_timeout` unused."""

    def __init__(self, clock: IReactorTime, max_idle_per_host: int = 256, idle_timeout: float = 50.0) -> None:
        self.clock = clock
        self.max_idle_per_host = max_idle_per_host
        self.idle_timeout = idle_timeout
        self._idle: dict[PoolKey, list[_Connection]] = {}
        # One sweep for all idle connections, not a timer per connection per request.
        self._since: dict[_Connection, float] = {}
        self._sweep: IDelayedCall | None = None

    def request(self, key: PoolKey, endpoint: IStreamClientEndpoint, method: bytes,
                path: bytes, headers: Fields, body: bytes | None) -> defer.Deferred[UpstreamResponse]:
        """The response head; cancelling the Deferred aborts the connection or the connect."""
        conn = self._take(key)
        if conn is None:
            return self._fresh(key, endpoint, method, path, headers, body)
        d = conn.send(method, path, headers, body)
        if method in _RETRYABLE:

            def retry(failure: Failure) -> defer.Deferred[UpstreamResponse]:
                # The upstream closed this idle connection as we reused it. Only a request that is
                # safe to repeat is retried: a POST may have been acted on.
                failure.trap(ResponseNeverReceived)
                return self._fresh(key, endpoint, method, path, headers, body)

            d.addErrback(retry)
        return d

    def _fresh(self, key: PoolKey, endpoint: IStreamClientEndpoint, method: bytes, path: bytes,
               headers: Fields, body: bytes | None) -> defer.Deferred[UpstreamResponse]:
        connecting: defer.Deferred[Any] = endpoint.connect(_ConnectionFactory(self, key))
        return connecting.addCallback(lambda conn: conn.send(method, path, headers, body))

    def _take(self, key: PoolKey) -> _Connection | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            self._since.pop(conn, None)
            if conn.state is IDLE:
                return conn
        return None

    def release(self, conn: _Connection) -> None:
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) >= self.max_idle_per_host:
            self._expire(conn)
            return
        idle.append(conn)
        self._since[conn] = self.clock.seconds()
        if self._sweep is None:
            self._sweep = self.clock.callLater(self.idle_timeout / 10, self._run_sweep)

    def _run_sweep(self) -> None:
        self._sweep = None
        deadline = self.clock.seconds() - self.idle_timeout
        for conn, since in list(self._since.items()):
            if since <= deadline:
                self._expire(conn)
        if self._since:
            self._sweep = self.clock.callLater(self.idle_timeout / 10, self._run_sweep)

    def _expire(self, conn: _Connection) -> None:
        self.forget(conn)
        conn.state = DEAD
        if conn.transport is not None:
            conn.transport.loseConnection()

    def forget(self, conn: _Connection) -> None:
        if self._since.pop(conn, None) is not None:
            idle = self._idle.get(conn.key)
            if idle and conn in idle:
                idle.remove(conn)

    def close(self) -> defer.Deferred[None]:
        for conn in list(self._since):
            self._expire(conn)
        self._idle.clear()
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep = None
        return defer.succeed(None)


class _ConnectionFactory(Factory):
    def __init__(self, pool: UpstreamPool, key: PoolKey) -> None:
        self.pool = pool
        self.key = key

    def buildProtocol(self, addr: object) -> _Connection:
        return _Connection(self.pool, self.key)

