"""The upstream HTTP/1.1 client, in memory: framing, keep-alive reuse, hostile responses, the pool."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web._newclient import ResponseFailed, ResponseNeverReceived
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from ccproxy.http.client import UpstreamPool, UpstreamResponse


class Endpoint:
    """Connects instantly to a StringTransport; remembers every connection made."""

    def __init__(self) -> None:
        self.connections: list[tuple[Any, StringTransport]] = []

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.connections.append((protocol, transport))
        return defer.succeed(protocol)


class Body(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        self.reason = reason


def start(pool: UpstreamPool, endpoint: Endpoint, method: bytes = b"POST",
          body: bytes | None = b"{}") -> defer.Deferred[UpstreamResponse]:
    headers = [(b"Host", [b"up.example"]), (b"X-Api-Key", [b"k"])]
    return defer.ensureDeferred(pool.request("key", endpoint, method, b"/v1/messages", headers, body))  # type: ignore[arg-type]


def exchange(reply: bytes, method: bytes = b"POST") -> tuple[UpstreamResponse, Body, Endpoint, UpstreamPool]:
    pool, endpoint = UpstreamPool(Clock()), Endpoint()
    d = start(pool, endpoint, method)
    protocol, _ = endpoint.connections[-1]
    protocol.dataReceived(reply)
    response = pool_result(d)
    body = Body()
    response.deliverBody(body)
    return response, body, endpoint, pool


def pool_result(d: defer.Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "no result yet"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def test_request_written_in_one_piece() -> None:
    pool, endpoint = UpstreamPool(Clock()), Endpoint()
    start(pool, endpoint)
    _, transport = endpoint.connections[0]
    assert transport.value() == (b"POST /v1/messages HTTP/1.1\r\nHost: up.example\r\nX-Api-Key: k\r\n"
                                 b"Content-Length: 2\r\n\r\n{}")


def test_content_length_response_and_reuse() -> None:
    response, body, endpoint, pool = exchange(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 5\r\nRequest-Id: r1\r\n\r\nhello")
    assert (response.code, response.phrase, response.length) == (200, b"OK", 5)
    assert response.headers.getRawHeaders(b"request-id") == [b"r1"]
    assert body.data == b"hello" and body.reason is not None and body.reason.check(ResponseDone)
    start(pool, endpoint)
    assert len(endpoint.connections) == 1  # the kept-alive connection was reused


def test_chunked_body_split_anywhere() -> None:
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
    for cut in range(len(raw)):
        pool, endpoint = UpstreamPool(Clock()), Endpoint()
        got: list[Any] = []
        start(pool, endpoint).addBoth(got.append)
        protocol, _ = endpoint.connections[0]
        body = Body()
        protocol.dataReceived(raw[:cut])
        if got:
            got[0].deliverBody(body)
            protocol.dataReceived(raw[cut:])
        else:
            protocol.dataReceived(raw[cut:])
            got[0].deliverBody(body)
        assert body.data == b"hello world", cut
        assert body.reason is not None and body.reason.check(ResponseDone), cut


def test_informational_response_skipped() -> None:
    response, body, _, _ = exchange(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")
    assert response.code == 201 and body.data == b"ok"


def test_read_until_close() -> None:
    _response, body, endpoint, _ = exchange(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npart")
    protocol, _ = endpoint.connections[0]
    protocol.connectionLost(Failure(Exception("closed")))
    assert body.data == b"part" and body.reason is not None and body.reason.check(PotentialDataLoss)


def test_head_and_no_body_codes() -> None:
    response, body, _, _ = exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", method=b"HEAD")
    assert body.data == b"" and body.reason is not None and body.reason.check(ResponseDone)
    response, body, _, _ = exchange(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert response.code == 204 and body.reason is not None and body.reason.check(ResponseDone)


def test_connection_close_not_reused() -> None:
    _, _, endpoint, pool = exchange(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
    start(pool, endpoint)
    assert len(endpoint.connections) == 2


@pytest.mark.parametrize("reply", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n folded: x\r\n\r\n",
    b"SMTP ready\r\n\r\n",
    b"HTTP/1.1 2000 OK\r\n\r\n",
])
def test_malformed_heads_fail_and_close(reply: bytes) -> None:
    pool, endpoint = UpstreamPool(Clock()), Endpoint()
    d = start(pool, endpoint)
    protocol, transport = endpoint.connections[0]
    protocol.dataReceived(reply)
    with pytest.raises(ResponseFailed):
        pool_result(d)
    assert transport.disconnecting or getattr(transport, "disconnected", False)


@pytest.mark.parametrize("chunks", [b"zz\r\n", b"5\r\nhelloXX", b"1" * 5000])
def test_malformed_chunks_fail_body(chunks: bytes) -> None:
    _response, body, _endpoint, _ = exchange(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks)
    assert body.reason is not None and body.reason.check(ResponseFailed)


def test_huge_head_refused() -> None:
    pool, endpoint = UpstreamPool(Clock()), Endpoint()
    d = start(pool, endpoint)
    protocol, _ = endpoint.connections[0]
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\n" + b"X-Big: " + b"a" * 300_000)
    with pytest.raises(ResponseFailed):
        pool_result(d)


def test_cancel_before_head_aborts() -> None:
    pool, endpoint = UpstreamPool(Clock()), Endpoint()
    d = start(pool, endpoint)
    protocol, _transport = endpoint.connections[0]
    d.cancel()
    with pytest.raises(defer.CancelledError):
        pool_result(d)
    protocol.connectionLost(Failure(Exception("aborted")))  # no second result for the same request


def test_stop_producing_aborts_body() -> None:
    pool, endpoint = UpstreamPool(Clock()), Endpoint()
    d = start(pool, endpoint)
    protocol, _transport = endpoint.connections[0]
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    body = Body()
    pool_result(d).deliverBody(body)
    body.transport.stopProducing()  # type: ignore[union-attr]
    protocol.connectionLost(Failure(Exception("aborted")))
    assert body.data == b"abc" and body.reason is not None and body.reason.check(ResponseFailed)
    start(pool, endpoint)
    assert len(endpoint.connections) == 2


def test_idle_connections_expire() -> None:
    clock = Clock()
    pool, endpoint = UpstreamPool(clock, idle_timeout=50), Endpoint()
    d = start(pool, endpoint)
    protocol, transport = endpoint.connections[0]
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    pool_result(d).deliverBody(Body())
    clock.advance(51)
    assert transport.disconnecting
    start(pool, endpoint)
    assert len(endpoint.connections) == 2


def test_stale_reused_connection_retried_only_for_safe_methods() -> None:
    for method, retried in ((b"GET", True), (b"POST", False)):
        pool, endpoint = UpstreamPool(Clock()), Endpoint()
        d = start(pool, endpoint, method, None)
        protocol, _ = endpoint.connections[0]
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        pool_result(d).deliverBody(Body())
        d2 = start(pool, endpoint, method, None)
        protocol.connectionLost(Failure(Exception("closed while idle")))
        if retried:
            assert len(endpoint.connections) == 2
            endpoint.connections[1][0].dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            assert pool_result(d2).code == 200
        else:
            with pytest.raises(ResponseNeverReceived):
                pool_result(d2)


def test_no_delay_reaches_the_tcp_transport_under_tls() -> None:
    from ccproxy.http.sockets import no_delay

    class TCP:
        nodelay = False

        def setTcpNoDelay(self, enabled: bool) -> None:
            self.nodelay = enabled

    class TLS:
        def __init__(self, transport: TCP) -> None:
            self.transport = transport

    tcp = TCP()
    no_delay(TLS(tcp))
    assert tcp.nodelay
    no_delay(StringTransport())  # nothing to set: no error
