"""The server side of HTTP/1.1 that replaced twisted.web's: framing, persistence, the request object."""

from __future__ import annotations

import gc
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET

from ccproxy.http.http1 import ChunkedDecoder, HeadScan, Malformed, TooLarge, _parse_head_by_line, parse_head
from ccproxy.http.request import ProxyRequest
from ccproxy.service import settle_heap
from tests.support.fake_tcp import FakeSocket, TcpConnection
from tests.support.hardening import Conn, config

GOOD = b"GET /v1/models HTTP/1.1\r\nHost: proxy\r\n\r\n"


class Scripted:
    """A resource whose answer is a function of the request; keeps every request it saw."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.seen: list[ProxyRequest] = []

    def render(self, request: ProxyRequest) -> Any:
        self.seen.append(request)
        return self.answer(request)


def streamed(request: ProxyRequest) -> Any:
    request.set_header(b"content-type", b"text/plain")
    request.write(b"hello ")
    request.write(b"world")
    request.finish()
    return NOT_DONE_YET


def dechunk(body: bytes) -> bytes:
    decoder = ChunkedDecoder(1 << 20)
    out = b"".join(decoder.feed(body))
    assert decoder.done and decoder.rest == b""
    return out


def split_response(output: bytes) -> tuple[bytes, dict[bytes, bytes], bytes]:
    head, _, body = output.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(b":", 1) for line in lines)}
    return status, headers, body


# -- response framing


def test_a_response_written_in_pieces_is_chunked_and_the_connection_kept() -> None:
    c = Conn(resource=Scripted(streamed)).send(GOOD)
    status, headers, body = split_response(c.output)
    assert status == b"HTTP/1.1 200 OK"
    assert headers[b"transfer-encoding"] == b"chunked" and b"content-length" not in headers
    assert dechunk(body) == b"hello world"
    assert headers[b"date"].endswith(b"GMT")
    assert not c.closed


def test_a_whole_body_gets_its_length_and_goes_out_in_one_write() -> None:
    c = Conn(resource=Scripted(lambda r: b"0123456789"))
    writes: list[bytes] = []
    c.transport.write = writes.append  # type: ignore[method-assign]
    c.send(GOOD)
    assert len(writes) == 1
    _status, headers, body = split_response(writes[0])
    assert headers[b"content-length"] == b"10" and body == b"0123456789"


def test_head_requests_get_headers_but_no_body() -> None:
    c = Conn(resource=Scripted(streamed)).send(b"HEAD /v1/models HTTP/1.1\r\nHost: a\r\n\r\n" + GOOD)
    first, second = c.output.split(b"HTTP/1.1 200 OK")[1:]
    assert first.endswith(b"\r\n\r\n")  # the HEAD response has no body, not even a last chunk
    assert dechunk(split_response(b"HTTP/1.1 200 OK" + second)[2]) == b"hello world"


@pytest.mark.parametrize("code", [204, 304])
def test_no_body_statuses_send_no_body(code: int) -> None:
    def answer(request: ProxyRequest) -> Any:
        request.set_status(code)
        request.write(b"ignored")
        request.finish()
        return NOT_DONE_YET

    c = Conn(resource=Scripted(answer)).send(GOOD + GOOD)
    assert c.output.count(b"HTTP/1.1 %d" % code) == 2
    assert b"ignored" not in c.output and b"transfer-encoding" not in c.output.lower()


def test_http10_gets_a_body_ended_by_close() -> None:
    c = Conn(resource=Scripted(streamed)).send(b"GET /v1/models HTTP/1.0\r\n\r\n")
    _status, headers, body = split_response(c.output)
    assert headers[b"connection"] == b"close" and b"transfer-encoding" not in headers
    assert body == b"hello world" and c.closed


def test_connection_close_is_honoured_after_the_response() -> None:
    c = Conn().send(b"GET /v1/models HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n" + GOOD)
    assert c.output.count(b"HTTP/1.1 200") == 1 and c.closed
    assert split_response(c.output)[1][b"connection"] == b"close"


def test_expect_100_continue_is_answered_before_the_body() -> None:
    c = Conn().send(b"POST /v1/messages HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
    assert c.output == b"HTTP/1.1 100 Continue\r\n\r\n"
    c.send(b"hello")
    assert c.output.count(b"HTTP/1.1 200") == 1 and c.resource.seen[0][2] == b"hello"


def test_a_resource_that_raises_gets_a_500_in_the_api_shape() -> None:
    def broken(request: ProxyRequest) -> Any:
        raise ValueError("bug")

    c = Conn(resource=Scripted(broken)).send(b"GET /openai/v1/models HTTP/1.1\r\nHost: a\r\n\r\n")
    status, _headers, body = split_response(c.output)
    assert status.startswith(b"HTTP/1.1 500")
    assert json.loads(body)["error"]["message"] == "internal proxy error"
    assert b"bug" not in c.output


# -- the request object


def test_notify_finish_fails_when_the_client_goes_away() -> None:
    resource = Scripted(lambda r: NOT_DONE_YET)
    c = Conn(resource=resource).send(GOOD)
    outcome: list[Any] = []
    resource.seen[0].when_finished().addBoth(outcome.append)
    reason = Failure(ConnectionLost("reset by peer"))
    c.channel.connectionLost(reason)
    assert len(outcome) == 1 and isinstance(outcome[0], Failure)
    assert outcome[0].value is reason.value  # the connection's own reason, not some other failure
    later: list[Any] = []
    resource.seen[0].when_finished().addBoth(later.append)  # asked after the client left
    assert len(later) == 1 and isinstance(later[0], Failure) and later[0].check(CancelledError)
    resource.seen[0].write(b"late")  # writing to a gone client is ignored, not an error
    resource.seen[0].finish()
    assert c.output.count(b"late") == 0


def test_pipelined_requests_are_answered_in_order() -> None:
    """What twisted.web's fixes for CVE-2023-46137 and CVE-2024-41671 ensure there, for our own server
    side: a pipelined request reaches the resource, and is answered, only once the one before it is done."""
    resource = Scripted(lambda r: NOT_DONE_YET)
    c = Conn(resource=resource).send(b"GET /v1/models?n=1 HTTP/1.1\r\nHost: a\r\n\r\n"
                                     b"POST /v1/messages HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\ntwo")
    assert len(resource.seen) == 1 and c.output == b""
    resource.seen[0].write(b"first answer")
    assert len(resource.seen) == 1  # still the first one's turn
    resource.seen[0].finish()
    assert len(resource.seen) == 2 and resource.seen[1].body_now() == b"two"
    resource.seen[1].write(b"second answer")
    resource.seen[1].finish()
    assert c.output.count(b"HTTP/1.1 200") == 2
    assert c.output.index(b"first answer") < c.output.index(b"HTTP/1.1 200", 1) < c.output.index(b"second answer")


def test_a_producer_registered_after_the_client_left_is_stopped() -> None:
    resource = Scripted(lambda r: NOT_DONE_YET)
    c = Conn(resource=resource).send(GOOD)
    c.channel.connectionLost()

    class Producer:
        stopped = False

        def stopProducing(self) -> None:
            self.stopped = True

    producer = Producer()
    resource.seen[0].registerProducer(producer, True)
    assert producer.stopped and c.transport.producer is None


def test_notify_finish_fires_on_finish_and_the_next_request_follows() -> None:
    resource = Scripted(lambda r: NOT_DONE_YET)
    Conn(resource=resource).send(GOOD + GOOD)
    done: list[Any] = []
    resource.seen[0].when_finished().addBoth(done.append)
    assert len(resource.seen) == 1  # the second waits its turn
    resource.seen[0].finish()
    assert done == [None] and len(resource.seen) == 2


def test_request_fields() -> None:
    bodies: list[bytes] = []
    resource = Scripted(lambda r: (r.read_body().addCallback(bodies.append), b"")[1])
    Conn(resource=resource).send(b"POST /v1/messages?beta=true HTTP/1.1\r\nHost: a\r\nX-Twice: 1\r\nx-twice: 2\r\n"
                                 b"Content-Length: 2\r\n\r\n{}")
    request = resource.seen[0]
    assert (request.method, request.target, request.path) == (b"POST", b"/v1/messages?beta=true", b"/v1/messages")
    assert request.request_headers.getRawHeaders(b"x-twice") == [b"1", b"2"]
    assert bodies == [b"{}"]
    assert request.peer_host() == "127.0.0.1" and request.client_address().host == "127.0.0.1"  # type: ignore[attr-defined]
    assert not request.is_secure()


def test_pipelined_bytes_past_the_buffer_pause_reading_until_the_response_is_done() -> None:
    resource = Scripted(lambda r: NOT_DONE_YET)
    c = Conn(resource=resource).send(GOOD)
    c.send(GOOD * 2000)  # 80 KB while the first request is answered
    assert c.transport.producerState == "paused"
    resource.seen[0].finish()
    assert c.transport.producerState == "producing"


def test_the_idle_deadline_runs_from_the_end_of_the_last_response() -> None:
    c = Conn(config(idle_timeout=10, header_timeout=1))
    c.send(GOOD)
    c.clock.advance(9)
    c.send(GOOD)  # served at t=9: idle from then on
    c.clock.advance(9)
    assert not c.closed
    c.clock.advance(1.1)
    assert c.closed


# -- the two readings of a head agree

_LINE = st.sampled_from([
    b"GET /v1/models HTTP/1.1", b"POST /v1/messages?beta=true HTTP/1.1", b"GET / HTTP/1.0", b"GET  /v1 HTTP/1.1",
    b"GET /v1 HTTP/2", b"GET http://x/ HTTP/1.1", b"G(T /v1 HTTP/1.1", b"GET /v\x7f HTTP/1.1",
])
_FIELD = st.sampled_from([
    b"Host: a", b"host:a", b"Host: b", b"Content-Length: 5", b"Content-Length: 5, 5", b"Content-Length: +5",
    b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip", b"Connection: close", b"Connection: keep-alive",
    b"Expect: 100-continue", b"X-A:\tb\t", b"X-B: a\x00b", b"X-C: a\x7fb", b"X-D: \xff\xfe", b"X(E): 1",
    b" folded", b"\tfolded", b"no colon", b"X-F: a\rb", b"X-G: a\nb", b"X-H:", b": empty name", b"X-I: \x0bx",
])


@settings(max_examples=500, deadline=None)
@given(_LINE, st.lists(_FIELD, max_size=6))
def test_fast_and_line_by_line_readings_agree(line: bytes, fields: list[bytes]) -> None:
    head = b"\r\n".join([line, *fields])
    outcomes = []
    for read in (parse_head, _parse_head_by_line):
        try:
            outcomes.append(read(head))
        except Malformed as e:
            outcomes.append(e.reason)  # type: ignore[arg-type]
    fast, slow = outcomes
    if isinstance(slow, str):
        assert isinstance(fast, str)  # the fast path never accepts what the careful one refuses
    else:
        assert fast == slow


_HEAD_PIECES = st.sampled_from([b"GET / HTTP/1.1", b"\r\n", b"\r", b"\n", b"Host: a", b"X: \r\n", b"\r\n\r\n", b"a"])


@settings(max_examples=300, deadline=None)
@given(st.lists(_HEAD_PIECES, max_size=12), st.lists(st.integers(min_value=1, max_value=9), min_size=1, max_size=8))
def test_head_scan_in_pieces_agrees_with_one_scan(pieces: list[bytes], cuts: list[int]) -> None:
    wire = b"".join(pieces)

    def outcome(parts: list[bytes]) -> Any:
        scan, buffer, found = HeadScan(64), bytearray(), -1
        for part in parts:
            buffer += part
            try:
                found = scan.find(buffer)
            except Malformed:
                return "bare"
            if found != -1:
                return found
        return found

    parts, at = [], 0
    for cut in cuts * (len(wire) // max(1, sum(cuts)) + 1):
        if at >= len(wire):
            break
        parts.append(wire[at : at + cut])
        at += cut
    parts.append(wire[at:])
    whole, split = outcome([wire]), outcome(parts)

    def kind(found: Any) -> str:
        return "refused" if found in ("bare", -2) else "wait" if found == -1 else "end"

    if kind(whole) == "end" and kind(split) == "refused":
        # A split may show a bare CR or LF before the end arrives: the whole head has it too, and is
        # refused when it is read.
        with pytest.raises(Malformed):
            parse_head(wire[:whole])
    else:
        assert (kind(split), split) == (kind(whole), whole) or kind(split) == kind(whole) == "refused"


_CHUNK_PIECES = st.sampled_from([
    b"5\r\nhello\r\n", b"0\r\n\r\n", b"3;x=1\r\nabc\r\n", b"X-T: 1\r\n", b"0\r\n", b"\r\n", b"\n", b"\r",
    b"zz\r\n", b"ff\r\n", b"1\r\na\r\n", b"a", b"next",
])


@settings(max_examples=300, deadline=None)
@given(st.lists(_CHUNK_PIECES, max_size=10), st.integers(min_value=1, max_value=7))
def test_chunked_decoder_in_pieces_agrees_with_one_feed(pieces: list[bytes], split: int) -> None:
    wire = b"".join(pieces)

    def outcome(parts: list[bytes]) -> Any:
        decoder, body, used = ChunkedDecoder(1 << 10), bytearray(), 0
        for part in parts:
            try:
                used += decoder.feed_into(part, body)
            except (Malformed, TooLarge) as e:
                return type(e).__name__
            if decoder.done:
                return bytes(body), used
        return bytes(body), None

    whole = outcome([wire])
    split_outcome = outcome([wire[i : i + split] for i in range(0, len(wire), split)])
    if isinstance(whole, str) or whole[1] is not None:
        assert split_outcome == whole  # the same body and end, or the same refusal
    else:
        assert isinstance(split_outcome, tuple) and split_outcome[1] is None  # still waiting, in both


def test_fast_reading_of_a_typical_head() -> None:
    head = parse_head(b"POST /v1/messages HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\nX-Api-Key:  k \r\n"
                      b"Connection: keep-alive, close")
    assert head.content_length == 12 and not head.chunked and not head.persistent
    assert head.headers[2] == (b"X-Api-Key", b"k")


# -- chunked request bodies


def test_chunked_decoder_byte_by_byte_with_extensions_and_trailers() -> None:
    wire = b"5;name=value\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\nNEXT"
    decoder = ChunkedDecoder(100)
    out = b"".join(b"".join(decoder.feed(wire[i : i + 1])) for i in range(len(wire)) if not decoder.done)
    assert out == b"hello world" and decoder.done
    whole = ChunkedDecoder(100)
    assert b"".join(whole.feed(wire)) == b"hello world" and whole.rest == b"NEXT"


@pytest.mark.parametrize("wire", [b"5\nhello\r\n", b"5\r\nhello\n0\r\n\r\n", b"0\r\nBad Trailer\r\n\r\n",
                                  b"0\r\n" + b"X-T: " + b"a" * 9000 + b"\r\n\r\n"])
def test_chunked_decoder_refuses_malformed_framing(wire: bytes) -> None:
    with pytest.raises(Malformed):
        ChunkedDecoder(1 << 20).feed(wire)


def test_chunked_decoder_refuses_before_the_data_when_sizes_pass_the_limit() -> None:
    decoder = ChunkedDecoder(10)
    assert decoder.feed(b"a\r\n0123456789\r\n") == [b"0123456789"]
    with pytest.raises(TooLarge):
        decoder.feed(b"1\r\n")


# -- the heap


def test_settle_heap_freezes_what_start_built() -> None:
    before = gc.get_threshold()
    try:
        settle_heap()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold()[0] == 10_000
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


# -- a client that takes nothing of its response


class Upstream:
    """Stands for the upstream socket a relay registers as producer."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def pauseProducing(self) -> None:
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.calls.append("resume")

    def stopProducing(self) -> None:
        self.calls.append("stop")


def streaming_request(send_timeout: float = 5) -> tuple[Conn, ProxyRequest, Upstream]:
    resource = Scripted(lambda r: NOT_DONE_YET)
    c = Conn(config(send_timeout=send_timeout), resource=resource).send(GOOD)
    request, upstream = resource.seen[0], Upstream()
    request.write(b"data: 1\n\n")
    request.registerProducer(upstream, True)
    return c, request, upstream


def test_a_client_taking_nothing_for_send_timeout_is_cut(seen_events: list[dict[str, Any]]) -> None:
    c, request, upstream = streaming_request()
    c.transport.producer.pauseProducing()  # the client's buffers are full
    assert upstream.calls == ["pause"]
    c.clock.advance(4.9)
    assert not c.transport.disconnecting
    c.clock.advance(0.2)
    assert c.transport.disconnecting  # aborted: StringTransport records an abort as disconnecting
    assert seen_events[-1]["ccproxy_event"] == "request_timeout" and seen_events[-1]["reason"] == "send_timeout"
    c.channel.connectionLost()
    assert request._disconnected


def test_a_client_that_drains_in_time_keeps_its_stream() -> None:
    c, request, _ = streaming_request()
    for _ in range(10):  # paused and resumed again and again: each pause gets its own deadline
        c.transport.producer.pauseProducing()
        c.clock.advance(4)
        c.transport.producer.resumeProducing()
    assert not c.transport.disconnecting
    request.unregisterProducer()
    c.transport.producer = None
    request.finish()
    assert c.clock.getDelayedCalls() and all(call.getTime() > c.clock.seconds() + 60 for call in c.clock.getDelayedCalls())


def test_a_slow_but_reading_client_pushes_the_deadline_back() -> None:
    from ccproxy.http.request import SendWatch

    class Channel:
        def __init__(self) -> None:
            from tests.support.hardening import Clock

            self.clock = Clock()
            self.site = self  # what SendWatch takes its clock from
            self.config = config(send_timeout=5)
            self.transport = Tcp()
            self.stalled = 0

        def send_stalled(self) -> None:
            self.stalled += 1

    class Tcp(TcpConnection):
        def __init__(self) -> None:
            super().__init__(FakeSocket())
            self._tempDataLen = 1000

    channel = Channel()
    watch = SendWatch(Upstream(), channel)
    watch.pauseProducing()  # 1000 bytes wait for the client
    channel.clock.advance(4)
    channel.transport._tempDataLen = 400  # it takes 600 of them
    channel.clock.advance(1)
    assert channel.stalled == 0  # slow, not stalled: a new deadline from here
    channel.clock.advance(4.9)
    assert channel.stalled == 0
    channel.clock.advance(0.2)  # and then it took nothing for a whole send_timeout
    assert channel.stalled == 1
