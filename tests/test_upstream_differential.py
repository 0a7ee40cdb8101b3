"""The same scripted upstream replies played through ccproxy's UpstreamPool and through Twisted's
Agent: what the relay would see (status, forwarded headers, body, how the body ended, or the class
of failure) must agree, except where ccproxy is deliberately stricter (listed, and checked to be
refused by ccproxy)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from ccproxy.forward import response_headers
from ccproxy.http.client import UpstreamPool
from tests.support.wire import Body, Endpoint

_REQUEST_HEADERS = [(b"Host", [b"up.example"]), (b"Content-Type", [b"application/json"])]


@dataclass(frozen=True)
class Case:
    name: str
    reply: bytes
    method: bytes = b"POST"
    close: bool = True  # the upstream closes the connection after the reply
    stricter: bool = False  # ccproxy refuses what Agent accepts


CORPUS = [
    Case("length", b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"),
    Case("length, kept open", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello", close=False),
    Case("chunked", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
         close=False),
    Case("chunked with trailer", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\nT: 1\r\n\r\n",
         close=False),
    Case("close-delimited", b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end"),
    Case("HTTP/1.0 close-delimited", b"HTTP/1.0 200 OK\r\n\r\nold"),
    Case("204", b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n", close=False),
    Case("304 with a length", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n", method=b"GET",
         close=False),
    Case("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", method=b"HEAD", close=False),
    Case("HEAD, chunked", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", method=b"HEAD", close=False),
    Case("100 then 200", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
    Case("103 then 200", b"HTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n"
         b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
    Case("SSE, chunked", b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
         + b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in (b"event: ping\ndata: {}\n\n", b"data: [DONE]\n\n"))
         + b"0\r\n\r\n", close=False),
    Case("HTTP/1.0 keep-alive", b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok",
         method=b"GET", close=False),
    Case("obs-text in a value", b"HTTP/1.1 200 OK\r\nX-Name: caf\xc3\xa9\r\nContent-Length: 0\r\n\r\n", close=False),
    Case("no reason phrase", b"HTTP/1.1 200\r\nContent-Length: 2\r\n\r\nok"),
    Case("429 with retry-after", b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 3\r\nContent-Length: 2\r\n\r\n{}"),
    Case("several set-cookie", b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\nContent-Length: 0\r\n\r\n"),
    Case("TE and CL", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 99\r\n\r\n"
         b"2\r\nok\r\n0\r\n\r\n"),
    Case("short body, then close", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"),
    Case("chunked cut", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab"),
    Case("closed before the head", b"HTTP/1.1 200 OK\r\nContent-Le"),
    Case("closed before a byte", b""),
    Case("not HTTP", b"SSH-2.0-OpenSSH_9.6\r\n\r\n"),
    Case("non-numeric status", b"HTTP/1.1 2xx OK\r\nContent-Length: 0\r\n\r\n"),
    Case("bad chunk size", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n"),
    Case("two lengths", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc"),
    Case("negative length", b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n"),
    Case("gzip only", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nxx"),
    # Stricter than Agent: each of these is read one way by Agent and could be read another by
    # the next hop (or splits the response), so ccproxy refuses it with a 502. (A list of equal
    # lengths is allowed by RFC 9110 but refused in requests too: one rule for both directions.)
    Case("gzip, chunked", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"),
    Case("space before the colon", b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok"),
    Case("101 unasked", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n"),
    Case("chunked, chunked", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
         b"2\r\nok\r\n0\r\n\r\n", stricter=True),
    Case("CR in the reason", b"HTTP/1.1 200 OK\rSet-Cookie: injected=1\r\nContent-Length: 2\r\n\r\nok",
         stricter=True),
    Case("NUL in a value", b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\nok", stricter=True),
    Case("bare LF line end", b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok", stricter=True),
    Case("status 600", b"HTTP/1.1 600 Odd\r\nContent-Length: 0\r\n\r\n", stricter=True),
    Case("list length", b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok", stricter=True),
    Case("HTTP/1.0 chunked", b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
         stricter=True),
]


def _ending(reason: Failure | None) -> str:
    if reason is None:
        return "unfinished"
    for kind in (ResponseDone, PotentialDataLoss):
        if reason.check(kind):
            return kind.__name__
    return "failed"


def _play(case: Case, request: Any, endpoint: Endpoint, bytewise: bool) -> tuple[Any, ...]:
    d = request()
    outcome: list[Any] = []
    d.addBoth(outcome.append)
    pieces = [case.reply[i : i + 1] for i in range(len(case.reply))] if bytewise else [case.reply]
    body = Body()
    for piece in pieces:
        endpoint.protocol.dataReceived(piece)
    if case.close:
        endpoint.protocol.connectionLost(Failure(ConnectionDone()))
    if not outcome:
        return ("no answer",)
    if isinstance(outcome[0], Failure):
        return ("refused",)
    response = outcome[0]
    response.deliverBody(body)
    headers = response_headers(Headers(dict(response.headers.getAllRawHeaders())), keep_length=False)
    forwarded = sorted((name.lower(), tuple(values)) for name, values in headers.getAllRawHeaders())
    return (response.code, response.phrase, forwarded, body.data, _ending(body.reason))


def through_ccproxy(case: Case, bytewise: bool) -> tuple[Any, ...]:
    pool, endpoint = UpstreamPool(Clock()), Endpoint()
    body = None if case.method in (b"GET", b"HEAD") else b"{}"
    return _play(case, lambda: pool.request("k", endpoint, case.method, b"/v1/x", _REQUEST_HEADERS, body),
                 endpoint, bytewise)


def through_agent(case: Case, bytewise: bool) -> tuple[Any, ...]:
    reactor = MemoryReactorClock()
    endpoint = Endpoint()
    agent = Agent.usingEndpointFactory(reactor, endpoint, pool=HTTPConnectionPool(reactor, persistent=False))
    producer = None if case.method in (b"GET", b"HEAD") else _Bytes(b"{}")
    headers = Headers({b"Content-Type": [b"application/json"]})
    return _play(case, lambda: agent.request(case.method, b"http://up.example/v1/x", headers, producer),
                 endpoint, bytewise)


@implementer(IBodyProducer)
class _Bytes:
    """A request body written at once (FileBodyProducer would need a cooperator turning)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.length = len(data)

    def startProducing(self, consumer: Any) -> defer.Deferred[None]:
        consumer.write(self.data)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@pytest.mark.parametrize("case", CORPUS, ids=[c.name for c in CORPUS])
@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
def test_ccproxy_and_agent_agree(case: Case, bytewise: bool) -> None:
    ours, theirs = through_ccproxy(case, bytewise), through_agent(case, bytewise)
    if case.stricter:
        assert ours == ("refused",) and theirs != ("refused",), (ours, theirs)
    else:
        assert ours == theirs

