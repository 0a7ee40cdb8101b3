"""A lean HTTP/1.1 client for the upstream hop, with a pool of persistent connections.

Twisted's Agent spends most of a small request's time in machinery a proxy does not need (a state
machine per request, a line parser per header, a Response object per body). This client writes a
request in one call, parses a response head in one pass, and hands the body to the same kind of
protocol `IResponse.deliverBody` takes, so the relay works with either.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Iterable, Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._newclient import ResponseFailed, ResponseNeverReceived
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from ccproxy.http.http1 import ChunkedDecoder, Malformed, TooLarge
from ccproxy.http.sockets import no_delay, send_now

log = Logger()

MAX_HEAD = 256 * 1024
_NO_BODY_CODES = frozenset({204, 304})
_RETRYABLE = frozenset({b"GET", b"HEAD", b"OPTIONS"})
# Shared: a body that ended well needs no Failure of its own (nothing reads a traceback from it).
_DONE = Failure(ResponseDone())

# Request header fields as (name, values) pairs, the shape of Headers.getAllRawHeaders().
Fields = Iterable[tuple[bytes, Sequence[bytes]]]
# What identifies the connections that can serve a request: scheme, host, port and settings.
PoolKey = Hashable
_STATUS_RE = re.compile(rb"^HTTP/1\.([01]) (\d{3})(?: (.*))?$")
_TOKEN_RE = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_FIELDS_RE = re.compile(rb"(?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t\x20-\x7e\x80-\xff]*\r\n)*")
_FRAMING_HEADERS = frozenset({b"connection", b"transfer-encoding", b"content-length"})


class UpstreamProtocolError(Exception):
    """The upstream answered with something that is not HTTP/1.1 as ccproxy reads it."""


class UpstreamResponse:
    """The head of an upstream response; `deliverBody` streams the body to a protocol."""

    def __init__(self, conn: _Connection, version: bytes, code: int, phrase: bytes, headers: Headers,
                 length: int | object) -> None:
        self._conn = conn
        self.version = (b"HTTP", 1, int(version))
        self.code = code
        self.phrase = phrase
        self.headers = headers
        self.length = length

    def deliverBody(self, protocol: Protocol) -> None:
        self._conn.deliver_body(protocol)


class _BodyProducer:
    """What the body protocol sees as its transport: pausing it pauses the upstream socket."""

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn

    def pauseProducing(self) -> None:
        if self._conn.transport is not None:
            self._conn.transport.pauseProducing()  # type: ignore[attr-defined]

    def resumeProducing(self) -> None:
        if self._conn.transport is not None:
            self._conn.transport.resumeProducing()  # type: ignore[attr-defined]

    def stopProducing(self) -> None:
        self._conn.abort()


class _Connection(Protocol):
    """One upstream connection, carrying one request at a time."""

    def __init__(self, pool: UpstreamPool, key: PoolKey) -> None:
        self.pool = pool
        self.key = key
        self.connected_ok = True
        self._reset()

    def connectionMade(self) -> None:
        no_delay(self.transport)

    def _reset(self) -> None:
        self._buffer = b""
        self._waiting: defer.Deferred[UpstreamResponse] | None = None
        self._method = b""
        self._body: Protocol | None = None
        self._pending: list[bytes] = []
        self._framing = ""
        self._remaining = 0
        self._chunks: ChunkedDecoder | None = None
        self._keep_alive = False
        self._finished = False
        # How the body ended, kept until a body protocol is there to be told.
        self._outcome: Failure | None = None

    # Requests

    def send(
        self, method: bytes, path: bytes, headers: Fields, body: bytes | None
    ) -> defer.Deferred[UpstreamResponse]:
        self._reset()
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
        return self._waiting

    def _cancel(self, _: defer.Deferred[UpstreamResponse]) -> None:
        self._waiting = None  # the Deferred fails with CancelledError by itself
        self.abort()

    def abort(self) -> None:
        self.connected_ok = False
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    # Responses

    def dataReceived(self, data: bytes) -> None:
        if self._waiting is not None:
            self._buffer += data
            self._parse_head()
        else:
            self._body_data(data)

    def _parse_head(self) -> None:
        while self._waiting is not None:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > MAX_HEAD:
                    self._fail_head(UpstreamProtocolError("response head too large"))
                return
            head, self._buffer = self._buffer[:end], self._buffer[end + 4 :]
            try:
                response = self._read_head(head)
            except UpstreamProtocolError as e:
                self._fail_head(e)
                return
            if response is None:  # an informational 1xx: the real head follows
                continue
            waiting, self._waiting = self._waiting, None
            rest, self._buffer = self._buffer, b""
            # The body bytes that came with the head are taken in first (held until deliverBody):
            # a small response is then whole when its reader arrives, and needs no waiting.
            if rest:
                self._body_data(rest)
            elif self._framing == "none" or (self._framing == "length" and self._remaining == 0):
                self._body_data(b"")
            waiting.callback(response)

    def _read_head(self, head: bytes) -> UpstreamResponse | None:
        status, _, fields = head.partition(b"\r\n")
        match = _STATUS_RE.match(status)
        if match is None:
            raise UpstreamProtocolError(f"bad status line {status[:80]!r}")
        minor, code, phrase = match.group(1), int(match.group(2)), match.group(3) or b""
        if 100 <= code < 200 and code != 101:
            return None
        headers = Headers()
        framing: dict[bytes, list[bytes]] = {}
        if fields:
            # One match checks every line (as a well-behaved upstream sends them); otherwise line by line.
            lines = fields.split(b"\r\n")
            well_formed = _FIELDS_RE.fullmatch(fields + b"\r\n") is not None
            for line in lines:
                name, sep, value = line.partition(b":")
                if not well_formed and (not sep or not _TOKEN_RE.match(name)):
                    raise UpstreamProtocolError(f"bad header line {line[:80]!r}")
                value = value.strip(b" \t")
                headers.addRawHeader(name, value)
                lower = name.lower()
                if lower in _FRAMING_HEADERS:
                    framing.setdefault(lower, []).append(value)
        self._choose_framing(code, minor, framing)
        length: int | object = self._remaining if self._framing == "length" else UNKNOWN_LENGTH
        if self._framing == "none":
            length = 0
        return UpstreamResponse(self, minor, code, phrase, headers, length)

    def _choose_framing(self, code: int, minor: bytes, framing: dict[bytes, list[bytes]]) -> None:
        connection = b",".join(framing.get(b"connection", [])).lower()
        self._keep_alive = minor == b"1" and b"close" not in connection
        encodings = b",".join(framing.get(b"transfer-encoding", [])).lower()
        lengths = framing.get(b"content-length", [])
        if self._method == b"HEAD" or code in _NO_BODY_CODES or code == 101:
            self._framing = "none"
        elif encodings:
            if encodings.replace(b" ", b"").split(b",")[-1] != b"chunked":
                raise UpstreamProtocolError("unsupported transfer-encoding")
            self._framing = "chunked"
            # The same strict reader as for request bodies; an upstream body has no size limit here.
            self._chunks = ChunkedDecoder(limit=2**64)
        elif lengths:
            values = {v.strip() for v in b",".join(lengths).split(b",")}
            if len(values) != 1 or not next(iter(values)).isdigit():
                raise UpstreamProtocolError("bad content-length")
            self._framing, self._remaining = "length", int(values.pop())
        else:
            self._framing, self._keep_alive = "close", False

    def _fail_head(self, error: Exception) -> None:
        waiting, self._waiting = self._waiting, None
        self.abort()
        if waiting is not None:
            waiting.errback(Failure(ResponseFailed([Failure(error)])))

    # Bodies

    def deliver_body(self, protocol: Protocol) -> None:
        self._body = protocol
        protocol.makeConnection(_BodyProducer(self))  # type: ignore[arg-type,unused-ignore]
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
            return
        if self._framing == "length":
            take = data[: self._remaining]
            self._remaining -= len(take)
            self._emit(take)
            if self._remaining == 0:
                self._complete(extra=len(data) > len(take))
        elif self._framing == "chunked":
            self._chunked(data)
        elif self._framing == "close":
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
        if self._body is None:
            if self._outcome is None:
                self._outcome = reason
            return
        body, self._body = self._body, None
        self._finished = True
        reusable = isinstance(reason.value, ResponseDone) and self._keep_alive and self.connected_ok
        if reusable:
            self.pool.release(self)
        elif self.transport is not None and self.connected_ok:
            self.connected_ok = False
            self.transport.loseConnection()
        if body is not None:
            body.connectionLost(reason)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        self.connected_ok = False
        self.pool.forget(self)
        if self._waiting is not None:
            waiting, self._waiting = self._waiting, None
            waiting.errback(Failure(ResponseNeverReceived([reason])))
        elif not self._finished and self._framing:
            if self._framing == "close":
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
            if conn.connected_ok:
                return conn
        return None

    def release(self, conn: _Connection) -> None:
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) >= self.max_idle_per_host:
            conn.connected_ok = False
            if conn.transport is not None:
                conn.transport.loseConnection()
            return
        conn._reset()
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
        conn.connected_ok = False
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

