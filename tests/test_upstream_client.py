"""The upstream HTTP/1.1 client, in memory: framing, keep-alive reuse, hostile responses, the pool."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss

from ccproxy.http.client import State, UpstreamPool, UpstreamResponse, protocol_error
from tests.support.wire import Body, Endpoint


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
    # The same rules as for request heads: no CR, LF or NUL where they could split or hide a line.
    b"HTTP/1.1 200 OK\rSet-Cookie: injected=1\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\n" * 9 + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
])
def test_malformed_heads_fail_and_close(reply: bytes) -> None:
    pool, endpoint = UpstreamPool(Clock()), Endpoint()
    d = start(pool, endpoint)
    protocol, transport = endpoint.connections[0]
    protocol.dataReceived(reply)
    with pytest.raises(ResponseFailed) as e:
        pool_result(d)
    assert protocol_error(e.value) is not None
    assert transport.disconnecting or getattr(transport, "disconnected", False)
    start(pool, endpoint)
    assert len(endpoint.connections) == 2


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


# -- the connection's lifecycle: the lessons of twisted's _newclient


class PausingBody(Body):
    """Pauses its producer on the first bytes, as the relay does when the client's buffers fill."""

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        self.transport.pauseProducing()  # type: ignore[union-attr]


def reused(pool: UpstreamPool, endpoint: Endpoint) -> bool:
    """Whether the next request goes out on the first connection (and is answered on it)."""
    d = start(pool, endpoint)
    if len(endpoint.connections) != 1:
        return False
    protocol, _ = endpoint.connections[0]
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    body = Body()
    pool_result(d).deliverBody(body)
    return body.data == b"ok"


def test_states_of_one_exchange() -> None:
    pool, endpoint = UpstreamPool(Clock()), Endpoint()
    d = start(pool, endpoint)
    protocol, _ = endpoint.connections[0]
    assert protocol.state is State.AWAITING_HEAD
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
    assert protocol.state is State.READING_BODY
    body = Body()
    pool_result(d).deliverBody(body)
    protocol.dataReceived(b"cd")
    assert protocol.state is State.IDLE and body.data == b"abcd"
    protocol.connectionLost(Failure(Exception("closed")))
    assert protocol.state is State.DEAD


def test_a_connection_paused_as_its_body_ends_is_resumed_before_it_is_pooled() -> None:
    pool, endpoint = UpstreamPool(Clock()), Endpoint()
    d = start(pool, endpoint)
    protocol, transport = endpoint.connections[0]
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    body = PausingBody()
    pool_result(d).deliverBody(body)
    protocol.dataReceived(b"3\r\nabc\r\n0\r\n\r\n")  # the reader pauses on "abc"; the body ends in the same read
    assert body.data == b"abc" and body.reason is not None and body.reason.check(ResponseDone)
    assert transport.producerState == "producing"
    assert reused(pool, endpoint)


def test_the_body_producer_is_detached_when_the_body_ends() -> None:
    pool, endpoint = UpstreamPool(Clock()), Endpoint()
    d = start(pool, endpoint)
    protocol, transport = endpoint.connections[0]
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
    body = Body()
    pool_result(d).deliverBody(body)
    # The client connection may pause or stop the producer it still holds: the pooled connection
    # must not feel it.
    body.transport.pauseProducing()  # type: ignore[union-attr]
    body.transport.stopProducing()  # type: ignore[union-attr]
    assert transport.producerState == "producing" and not transport.disconnecting
    assert protocol.state is State.IDLE
    assert reused(pool, endpoint)


def test_a_byte_on_an_idle_connection_closes_it_and_drops_it_from_the_pool() -> None:
    pool, endpoint = UpstreamPool(Clock()), Endpoint()
    exchange_on(pool, endpoint, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    protocol, transport = endpoint.connections[0]
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\ninjected")
    assert transport.disconnecting and protocol.state is State.DEAD
    assert not reused(pool, endpoint)
    assert len(endpoint.connections) == 2


def exchange_on(pool: UpstreamPool, endpoint: Endpoint, reply: bytes, method: bytes = b"POST") -> Body:
    d = start(pool, endpoint, method)
    protocol, _ = endpoint.connections[-1]
    protocol.dataReceived(reply)
    body = Body()
    pool_result(d).deliverBody(body)
    return body


@pytest.mark.parametrize("reply,keep", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", True),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n2\r\nok\r\n0\r\n\r\n", False),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", False),
    (b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", False),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", False),
    (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok", True),
    (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", False),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA", False),  # bytes past the end
])
def test_when_a_connection_is_kept_alive(reply: bytes, keep: bool) -> None:
    pool, endpoint = UpstreamPool(Clock()), Endpoint()
    body = exchange_on(pool, endpoint, reply)
    assert body.data == b"ok" and body.reason is not None and body.reason.check(ResponseDone)
    protocol, transport = endpoint.connections[0]
    assert (protocol.state is State.IDLE) is keep and transport.disconnecting is not keep
    assert reused(pool, endpoint) is keep


def test_a_head_trickled_a_byte_at_a_time_is_searched_once() -> None:
    pool, endpoint = UpstreamPool(Clock()), Endpoint()
    d = start(pool, endpoint)
    protocol, _ = endpoint.connections[0]
    head = b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"a" * 100_000 + b"\r\nContent-Length: 0\r\n\r\n"

    class Counting(bytearray):
        examined = 0

        def find(self, sub: Any, start: Any = 0, *args: Any) -> int:
            Counting.examined += len(self) - start
            return super().find(sub, start, *args)

    protocol.dataReceived(head[:1])
    protocol._buffer = Counting(protocol._buffer)  # the buffer the rest of the head is added to
    for i in range(1, len(head)):
        protocol.dataReceived(head[i : i + 1])
    assert isinstance(protocol._buffer, bytes)  # found, and the buffer let go
    assert pool_result(d).code == 200
    # Each read is searched with a 3-byte overlap: about 4 bytes examined per byte received.
    assert len(head) <= Counting.examined <= 5 * len(head)


def test_a_body_is_delivered_once() -> None:
    pool, endpoint = UpstreamPool(Clock()), Endpoint()
    d = start(pool, endpoint)
    endpoint.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na")
    response = pool_result(d)
    response.deliverBody(Body())
    assert reused(pool, endpoint)  # the connection now carries another exchange
    with pytest.raises(RuntimeError):
        response.deliverBody(Body())


@pytest.mark.parametrize("pieces", [1, 3])
def test_a_head_over_the_limit_is_refused_even_when_whole(pieces: int) -> None:
    from ccproxy.http.client import MAX_HEAD

    head = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * MAX_HEAD + b"\r\nContent-Length: 0\r\n\r\n"
    pool, endpoint = UpstreamPool(Clock()), Endpoint()
    d = start(pool, endpoint)
    step = len(head) // pieces + 1
    for i in range(0, len(head), step):
        endpoint.protocol.dataReceived(head[i : i + step])
    with pytest.raises(ResponseFailed):
        pool_result(d)
