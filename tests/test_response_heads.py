"""Upstream response heads are read by the same strict rules as request heads, and what ccproxy
writes to a client is checked again: nothing that could split or smuggle a response crosses."""

from __future__ import annotations

import json
import socket
import ssl
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ccproxy.http.http1 import (
    CHUNKED,
    LENGTH,
    NO_BODY,
    UNTIL_CLOSE,
    Malformed,
    _parse_response_head_by_line,
    parse_response_head,
)
from ccproxy.http.request import ProxyRequest
from tests.support.upstream import FakeUpstream, Script
from tests.support.wire import FakeChannel


def reason(head: bytes, method: bytes = b"GET") -> str:
    with pytest.raises(Malformed) as e:
        parse_response_head(head, method)
    return e.value.reason


# -- the reader


@pytest.mark.parametrize("head", [
    b"HTTP/1.1 200 OK\rSet-Cookie: injected=1",
    b"HTTP/1.1 200 OK\nSet-Cookie: injected=1",
    b"HTTP/1.1 200 O\x00K",
    b"HTTP/1.1 200 OK\r\nX-A: a\x00b",
    b"HTTP/1.1 200 OK\r\nX-A: a\x7fb",
    b"HTTP/1.1 200 OK\r\nX-A: a\rb",
    b"HTTP/1.1 200 OK\r\nBad Name: 1",
    b"HTTP/1.1 200 OK\r\n folded: 1",
    b"HTTP/1.1 200 OK\r\n: empty",
    b"HTTP/1.1 2000 OK",
    b"HTTP/1.1 099 Low",
    b"HTTP/1.1 600 High",
    b"HTTP/2 200 OK",
    b"HTTP/1.1  200 OK",
    b"SMTP ready",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
    b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5",
    b"HTTP/1.1 200 OK\r\nContent-Length: +5",
    b"HTTP/1.1 200 OK\r\nContent-Length: 0x5",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade",
])
def test_heads_refused(head: bytes) -> None:
    assert reason(head)
    assert reason(head, b"HEAD")  # a bad framing header is refused even where no body follows


@pytest.mark.parametrize("head,method,framing,length,persistent", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 12", b"POST", LENGTH, 12, True),
    (b"HTTP/1.1 200\r\nContent-Length: 0", b"GET", LENGTH, 0, True),  # no reason phrase at all
    (b"HTTP/1.1 200 OK\r\ntransfer-encoding: Chunked", b"POST", CHUNKED, None, True),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3", b"POST", CHUNKED, None, False),
    (b"HTTP/1.1 200 OK", b"POST", UNTIL_CLOSE, None, False),
    (b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\nContent-Length: 1", b"POST", LENGTH, 1, False),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 1", b"GET", LENGTH, 1, False),
    (b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 1", b"GET", LENGTH, 1, True),
    (b"HTTP/1.1 204 No Content", b"POST", NO_BODY, 0, True),
    (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 99", b"GET", NO_BODY, 0, True),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 99", b"HEAD", NO_BODY, 0, True),
    (b"HTTP/1.1 200 OK \xe9t\xe9\t", b"GET", UNTIL_CLOSE, None, False),  # obs-text and HTAB in a reason
])
def test_framing_of_good_heads(head: bytes, method: bytes, framing: str, length: int | None,
                               persistent: bool) -> None:
    parsed = parse_response_head(head, method)
    assert (parsed.framing, parsed.length, parsed.persistent) == (framing, length, persistent)


def test_a_reason_phrase_with_a_bare_cr_is_not_split_into_a_header() -> None:
    # The line-by-line reader names the fault; the one-pass reader never accepts it.
    with pytest.raises(Malformed) as e:
        _parse_response_head_by_line(b"HTTP/1.1 200 OK\rSet-Cookie: injected=1", b"GET")
    assert e.value.reason == "bare_cr_or_lf"


_STATUS = st.sampled_from([
    b"HTTP/1.1 200 OK", b"HTTP/1.1 200", b"HTTP/1.1 200 ", b"HTTP/1.0 404 Not Found", b"HTTP/1.1 204 No Content",
    b"HTTP/1.1 100 Continue", b"HTTP/1.1 101 Switching", b"HTTP/1.1 999 X", b"HTTP/1.1 20 OK", b"HTTP/2 200 OK",
    b"HTTP/1.1 200 O\rK", b"HTTP/1.1 200 O\x00K", b"HTTP/1.1 200 O\x7fK", b"HTTP/1.1 200 \xff\tok", b"http/1.1 200 OK",
])
_RESPONSE_FIELD = st.sampled_from([
    b"Content-Length: 5", b"Content-Length: 5, 5", b"Content-Length: +5", b"content-length:0",
    b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip, chunked", b"Transfer-Encoding: CHUNKED",
    b"Connection: close", b"Connection: keep-alive", b"X-A:\tb\t", b"X-B: a\x00b", b"X-C: a\x7fb",
    b"X-D: \xff\xfe", b"X(E): 1", b" folded", b"\tfolded", b"no colon", b"X-F: a\rb", b"X-G: a\nb", b"X-H:",
    b": empty name", b"Set-Cookie: a=1",
])


@settings(max_examples=500, deadline=None)
@given(_STATUS, st.lists(_RESPONSE_FIELD, max_size=6), st.sampled_from([b"GET", b"HEAD", b"POST"]))
def test_fast_and_line_by_line_readings_of_responses_agree(status: bytes, fields: list[bytes],
                                                           method: bytes) -> None:
    head = b"\r\n".join([status, *fields])
    outcomes: list[Any] = []
    for read in (parse_response_head, _parse_response_head_by_line):
        try:
            outcomes.append(read(head, method))
        except Malformed as e:
            outcomes.append(e.reason)
    fast, slow = outcomes
    if isinstance(slow, str):
        assert isinstance(fast, str)  # the fast path never accepts what the careful one refuses
    else:
        assert fast == slow


# -- what ProxyRequest writes


def written(code: int, phrase: bytes | None, headers: list[tuple[bytes, bytes]]) -> bytes:
    from twisted.web.http_headers import Headers

    channel = FakeChannel()
    request = ProxyRequest(channel, b"GET", b"/v1/models", Headers(), 0.0, b"")
    request.set_status(code, phrase)
    for name, value in headers:
        request.response_headers.addRawHeader(name, value)
    request.respond(b"ok")
    return channel.transport.value()


def test_request_writes_a_valid_head_unchanged() -> None:
    out = written(200, b"Fine", [(b"X-A", b"1")])
    assert out.startswith(b"HTTP/1.1 200 Fine\r\n") and b"X-A: 1\r\n" in out and out.endswith(b"\r\n\r\nok")


@pytest.mark.parametrize("phrase", [b"OK\rSet-Cookie: injected=1", b"OK\r\nSet-Cookie: injected=1", b"O\x00K"])
def test_an_invalid_reason_phrase_is_replaced_where_it_is_written(phrase: bytes) -> None:
    out = written(200, phrase, [])
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and b"injected" not in out and b"\x00" not in out


def test_an_invalid_header_value_is_not_written() -> None:
    # (twisted's Headers refuses a bad name itself, and turns CR and LF in a value into spaces.)
    out = written(200, None, [(b"X-Bad", b"a\x00b"), (b"X-Good", b"1"), (b"X-Del", b"a\x7fb")])
    assert b"X-Bad" not in out and b"X-Del" not in out and b"X-Good: 1\r\n" in out
    head, _, body = out.partition(b"\r\n\r\n")
    assert body == b"ok" and b"content-length: 2" in head.lower()


def test_an_impossible_status_is_written_as_502() -> None:
    assert written(1000, b"Huge", []).startswith(b"HTTP/1.1 502 Bad Gateway\r\n")


# -- end to end: the real daemon, a raw upstream, a raw TLS client


def _raw_exchange(d: Any, request: bytes) -> bytes:
    with socket.create_connection((d.host, d.port), timeout=20) as sock:
        context: ssl.SSLContext = d.ssl_context()
        with context.wrap_socket(sock, server_hostname="localhost") as tls:
            tls.sendall(request)
            out = b""
            while chunk := tls.recv(65536):
                out += chunk
    return out


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 200 OK\rSet-Cookie: injected=1\r\nContent-Length: 2\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\nSet-Cookie: injected=1\x00\r\nContent-Length: 2\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
    b"2\r\n{}\r\n0\r\n\r\n",
])
def test_an_invalid_upstream_head_is_a_502_in_the_api_shape(daemon: Any, upstream: FakeUpstream, raw: bytes) -> None:
    d = daemon()
    upstream.expect(Script(raw=raw))
    out = _raw_exchange(d, b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 2\r\nConnection: close\r\n\r\n{}")
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502 "), out[:200]
    assert b"injected" not in out and b"\x00" not in out
    error = json.loads(body)
    assert error["type"] == "error" and error["error"]["type"] == "api_error"
    assert "invalid response" in error["error"]["message"]
    # The next request is served: the broken connection was not pooled.
    out = _raw_exchange(d, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 "), out[:200]
