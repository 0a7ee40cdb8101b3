"""The hardened channel, in memory: the smuggling corpus, size limits, deadlines, error shape."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.testing import StringTransport
from zope.interface import directlyProvides

from ccproxy.config.network import DEFAULT_SECURITY_HEADERS
from tests.support.hardening import Conn, Recorder, config

GOOD = b"GET /v1/models HTTP/1.1\r\nHost: proxy\r\n\r\n"


def body_of(output: bytes) -> Any:
    return json.loads(output.split(b"\r\n\r\n", 1)[1])


def headers_of(output: bytes) -> dict[str, str]:
    head = output.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")[1:]
    return {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in head)}


# Requests that two HTTP parsers could read differently, or that are simply not HTTP/1.1.
SMUGGLING = {
    "cl_and_te": b"POST /v1/messages HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"0\r\n\r\n",
    "te_and_cl": b"POST /v1/messages HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n"
                 b"0\r\n\r\n",
    "two_different_cl": b"POST /v1/messages HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n"
                        b"hello",
    "two_equal_cl": b"POST /v1/messages HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
    "cl_list": b"POST /v1/messages HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\nhello",
    "cl_signed": b"POST /v1/messages HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\nhello",
    "cl_hex": b"POST /v1/messages HTTP/1.1\r\nHost: a\r\nContent-Length: 0x5\r\n\r\nhello",
    "cl_space_before_colon": b"POST /v1/messages HTTP/1.1\r\nHost: a\r\nContent-Length : 5\r\n\r\nhello",
    "te_identity": b"POST /v1/messages HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\n\r\nhello",
    "te_list": b"POST /v1/messages HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "te_twice": b"POST /v1/messages HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te_vertical_tab": b"POST /v1/messages HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \x0bchunked\r\n\r\n0\r\n\r\n",
    "te_in_http10": b"POST /v1/messages HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "obs_fold": b"GET /v1/models HTTP/1.1\r\nHost: a\r\nX-Note: one\r\n two\r\n\r\n",
    "obs_fold_te": b"POST /v1/messages HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
    "bare_cr_in_value": b"GET /v1/models HTTP/1.1\r\nHost: a\r\nX-Note: a\rb\r\n\r\n",
    "bare_cr_line_end": b"GET /v1/models HTTP/1.1\rHost: a\r\n\r\n",
    "bare_lf_lines": b"GET /v1/models HTTP/1.1\nHost: a\n\n",
    "nul_in_value": b"GET /v1/models HTTP/1.1\r\nHost: a\r\nX-Note: a\x00b\r\n\r\n",
    "space_in_target": b"GET /v1/mod els HTTP/1.1\r\nHost: a\r\n\r\n",
    "double_space": b"GET  /v1/models HTTP/1.1\r\nHost: a\r\n\r\n",
    "tab_in_target": b"GET /v1/mod\tels HTTP/1.1\r\nHost: a\r\n\r\n",
    "non_ascii_target": b"GET /v1/mod\xffels HTTP/1.1\r\nHost: a\r\n\r\n",
    "absolute_form": b"GET http://evil.example/v1/models HTTP/1.1\r\nHost: a\r\n\r\n",
    "two_part_line": b"GET /v1/models\r\nHost: a\r\n\r\n",
    "http2_version": b"GET /v1/models HTTP/2.0\r\nHost: a\r\n\r\n",
    "lowercase_version": b"GET /v1/models http/1.1\r\nHost: a\r\n\r\n",
    "no_host": b"GET /v1/models HTTP/1.1\r\nAccept: */*\r\n\r\n",
    "two_hosts": b"GET /v1/models HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "no_colon": b"GET /v1/models HTTP/1.1\r\nHost: a\r\nX-Note\r\n\r\n",
    "bad_name": b"GET /v1/models HTTP/1.1\r\nHost: a\r\nX(Note): 1\r\n\r\n",
    "chunk_size_not_hex": b"POST /v1/messages HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    "chunk_size_signed": b"POST /v1/messages HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n",
    "chunk_size_0x": b"POST /v1/messages HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
    "chunk_size_too_long": b"POST /v1/messages HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                           + b"5;" + b"x" * 1100 + b"\r\nhello\r\n0\r\n\r\n",
    "chunk_ext_bad": b"POST /v1/messages HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"5;\x01\r\nhello\r\n0\r\n\r\n",
    "chunk_missing_crlf": b"POST /v1/messages HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                          b"5\r\nhelloXX0\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(SMUGGLING))
def test_smuggling_corpus_is_refused_and_never_forwarded(name: str, seen_events: list[dict[str, Any]]) -> None:
    c = Conn().send(SMUGGLING[name] + GOOD)
    assert c.status() == 400, c.output
    assert c.closed
    assert c.resource.seen == []  # neither the bad request nor the one after it reached the resource
    assert body_of(c.output)["error"]["type"] == "invalid_request_error"
    assert headers_of(c.output)["request-id"].startswith("req_ccp_")
    assert c.output.count(b"request-id:") == 1
    assert [e["ccproxy_event"] for e in seen_events] == ["invalid_request"]
    assert seen_events[0]["ip_address"] == "127.0.0.1"


def test_bad_request_after_a_good_one_in_the_same_packet() -> None:
    c = Conn().send(GOOD + SMUGGLING["cl_and_te"])
    assert c.resource.seen == [(b"GET", b"/v1/models", b"")]
    assert c.output.count(b"HTTP/1.1 200") == 1 and c.output.count(b"HTTP/1.1 400") == 1
    assert c.closed


def test_pipelined_requests_each_pass_the_checks() -> None:
    post = b"POST /v1/messages HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
    chunked = b"POST /v1/messages HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    c = Conn().send(post + chunked + GOOD)
    assert [s[2] for s in c.resource.seen] == [b"hello", b"abc", b""]
    assert not c.closed


def test_byte_by_byte_request_is_served() -> None:
    c = Conn()
    for i in range(len(GOOD)):
        c.send(GOOD[i : i + 1])
    assert c.status() == 200


def test_openai_paths_get_openai_error_shape() -> None:
    c = Conn().send(b"GET /openai/v1/mod els HTTP/1.1\r\nHost: a\r\n\r\n")
    assert body_of(c.output)["error"]["type"] == "invalid_request_error"
    assert "param" in body_of(c.output)["error"]
    assert c.status() == 400


# -- sizes


def _head_of_size(size: int) -> bytes:
    """A GET whose request line and header lines (with their CRLFs) are exactly `size` bytes."""
    base = b"GET /v1/models HTTP/1.1\r\nHost: a\r\n"
    filler = size - len(base) - len(b"X-Pad: \r\n")
    return base + b"X-Pad: " + b"p" * filler + b"\r\n" + b"\r\n"


def test_header_size_limit_is_exact(seen_events: list[dict[str, Any]]) -> None:
    assert Conn(config(max_header_size=1024)).send(_head_of_size(1024)).status() == 200
    c = Conn(config(max_header_size=1024)).send(_head_of_size(1025))
    assert c.status() == 431
    assert c.closed and c.resource.seen == []
    assert body_of(c.output)["error"]["type"] == "request_too_large"
    event = seen_events[-1]
    assert (event["ccproxy_event"], event["reason"], event["limit"]) == ("request_too_large", "header_size", 1024)


def test_header_limit_hit_before_the_head_ends() -> None:
    c = Conn(config(max_header_size=1024)).send(b"GET /v1/models HTTP/1.1\r\nX-Pad: " + b"p" * 2000)
    assert c.status() == 431 and c.closed


def test_many_small_headers_count_towards_the_limit() -> None:
    head = b"GET /v1/models HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(400)) + b"\r\n"
    assert Conn(config(max_header_size=2048)).send(head).status() == 431


def test_declared_length_over_limit_refused_before_body(seen_events: list[dict[str, Any]]) -> None:
    c = Conn(config(max_request_size=100)).send(
        b"POST /v1/messages HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 101\r\n\r\n"
    )
    assert c.status() == 413  # at once: no 100 Continue, no waiting for the body
    assert c.closed and c.resource.seen == []
    assert seen_events[-1]["reason"] == "content_length" and seen_events[-1]["path"] == "/v1/messages"
    c.send(b"x" * 101)
    assert c.resource.seen == []


def test_declared_length_at_limit_is_served() -> None:
    c = Conn(config(max_request_size=100)).send(
        b"POST /v1/messages HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n" + b"x" * 100
    )
    assert c.status() == 200 and c.resource.seen[0][2] == b"x" * 100


def test_chunked_body_cut_at_limit(seen_events: list[dict[str, Any]]) -> None:
    c = Conn(config(max_request_size=100))
    c.send(b"POST /v1/messages HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    c.send(b"3c\r\n" + b"a" * 60 + b"\r\n")
    assert c.output == b""
    c.send(b"3c\r\n" + b"b" * 60 + b"\r\n" + b"3c\r\n" + b"c" * 60 + b"\r\n0\r\n\r\n" + GOOD)
    assert c.status() == 413 and c.closed
    assert c.resource.seen == []
    assert c.channel.body == []  # the refused body is dropped, nothing past the limit kept
    assert seen_events[-1]["reason"] == "body_size"


def test_chunk_declared_over_limit_refused_before_its_data() -> None:
    c = Conn(config(max_request_size=100))
    c.send(b"POST /v1/messages HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n65\r\n")
    assert c.status() == 413 and c.closed
    huge = Conn().send(b"POST /v1/messages HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"fffffffffffffffffffff\r\nhello\r\n0\r\n\r\n")
    assert huge.status() == 413 and huge.closed and huge.resource.seen == []


def test_chunked_body_at_limit_is_served() -> None:
    c = Conn(config(max_request_size=120)).send(
        b"POST /v1/messages HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        + (b"3c\r\n" + b"a" * 60 + b"\r\n") * 2 + b"0\r\n\r\n"
    )
    assert c.status() == 200 and len(c.resource.seen[0][2]) == 120


# -- deadlines


def test_header_deadline_counts_from_first_byte_not_last(seen_events: list[dict[str, Any]]) -> None:
    c = Conn(config(header_timeout=5))
    head = b"GET /v1/models HTTP/1.1\r\nHost: a\r\n"
    for i in range(5):
        c.send(head[i : i + 1])
        c.clock.advance(0.99)
    assert c.output == b""
    c.clock.advance(0.06)
    assert c.status() == 408 and c.closed
    assert body_of(c.output)["error"]["type"] == "timeout_error"
    assert (seen_events[-1]["ccproxy_event"], seen_events[-1]["reason"]) == ("request_timeout", "header_timeout")


def test_body_deadline(seen_events: list[dict[str, Any]]) -> None:
    c = Conn(config(read_timeout=3, header_timeout=1))
    c.send(b"POST /v1/messages HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n")
    for _ in range(5):
        c.clock.advance(0.5)
        c.send(b"x")
    c.clock.advance(0.6)
    assert c.status() == 408 and c.closed and c.resource.seen == []
    assert seen_events[-1]["reason"] == "body_timeout"


def test_idle_keepalive_connection_closed_quietly() -> None:
    c = Conn(config(idle_timeout=4, header_timeout=1)).send(GOOD)
    output = c.output
    c.clock.advance(3.9)
    assert not c.closed
    c.clock.advance(0.2)
    assert c.closed and c.output == output  # no error response for an idle close


def test_no_deadline_cuts_a_long_response() -> None:
    held = Recorder(hold=True)
    c = Conn(config(idle_timeout=1, header_timeout=1, read_timeout=1, tls_handshake_timeout=1), resource=held)
    c.send(b"POST /v1/messages HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi")
    request = held.open[0]
    for i in range(600):  # ten minutes of a slow stream
        c.clock.advance(1)
        request.write(b"event %d\n" % i)
    assert not c.closed
    request.finish()
    assert c.output.endswith(b"0\r\n\r\n") and b"event 599" in c.output
    c.clock.advance(1.01)
    assert c.closed  # and the idle timer is back once it ended


def test_request_sent_during_a_long_response_waits_its_turn() -> None:
    held = Recorder(hold=True)
    c = Conn(config(header_timeout=1, read_timeout=1), resource=held).send(GOOD)
    c.send(GOOD)
    c.clock.advance(30)
    assert len(held.seen) == 1 and not c.closed
    held.open[0].finish()
    assert len(held.seen) == 2


class TLSStringTransport(StringTransport):
    def setTcpNoDelay(self, enabled: bool) -> None:
        pass


def test_tls_handshake_deadline(seen_events: list[dict[str, Any]]) -> None:
    c = Conn(config(tls_handshake_timeout=2, idle_timeout=60))
    transport = TLSStringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 1))
    directlyProvides(transport, ISSLTransport)
    slow = c.site.buildProtocol(None)
    slow.makeConnection(transport)
    c.clock.advance(2.01)
    assert transport.disconnecting or getattr(transport, "aborted", False)
    assert seen_events[-1]["reason"] == "tls_handshake_timeout"

    transport = TLSStringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 2))
    directlyProvides(transport, ISSLTransport)
    quick = c.site.buildProtocol(None)
    quick.makeConnection(transport)
    c.clock.advance(1)
    quick.handshakeCompleted()
    c.clock.advance(30)
    assert not transport.disconnecting


# -- security headers on our own errors


def test_own_errors_carry_security_headers_but_hsts_only_over_tls() -> None:
    out = headers_of(Conn().send(SMUGGLING["obs_fold"]).output)
    for name, value in DEFAULT_SECURITY_HEADERS:
        if name == "Strict-Transport-Security":
            assert name.lower() not in out
        else:
            assert out[name.lower()] == value
    assert out["connection"] == "close"


# -- whatever arrives, the answer is a clean 4xx or a normal response, never a crash


_PIECES = [b"GET ", b"POST ", b"/v1/messages", b" HTTP/1.1", b" HTTP/1.0", b"\r\n", b"\n", b"\r", b" ", b"\t",
           b"Host: a", b"Content-Length: ", b"Transfer-Encoding: chunked", b"5", b"0", b"ff", b"-1", b":",
           b"hello", b"\x00", b"\xff", b";ext", b"X-A: b"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(_PIECES), max_size=30), st.integers(min_value=1, max_value=7))
def test_arbitrary_input_never_crashes(pieces: list[bytes], split: int) -> None:
    data = b"".join(pieces)
    c = Conn(config(max_request_size=64, max_header_size=256))
    for i in range(0, len(data), split):
        c.send(data[i : i + split])
    c.clock.advance(3600)  # every deadline passes
    statuses = [int(line[9:12]) for line in c.output.split(b"\r\n") if line.startswith(b"HTTP/1.1 ")]
    assert set(statuses) <= {200, 400, 408, 413, 431}
    assert c.closed or not c.output or statuses[-1] == 200
