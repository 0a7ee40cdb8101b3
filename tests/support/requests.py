"""A stand-in for ccproxy's ProxyRequest where a test drives a layer or the relay without a connection.

It answers to the same names as `ccproxy.http.request.ProxyRequest` (tests/test_request_names.py
holds it to them) and records the response instead of writing it: `written` (each write), `producer`
(what was registered), `aborted`.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IProducer
from twisted.web.http_headers import Headers

from ccproxy.context import RequestContext
from ccproxy.http.request import ProxyRequest

# What the fake has that a ProxyRequest has not: what it records.
RECORDING = frozenset({"written", "producer", "aborted"})


class FakeRequest:
    request_id = "-"
    ctx: RequestContext | None = None

    def __init__(self, method: bytes = b"POST", target: bytes = b"/v1/messages",
                 headers: dict[bytes, list[bytes]] | None = None, secure: bool = False,
                 client: str = "127.0.0.1", started: float = 0.0) -> None:
        self.method = method
        self.target = target
        self.path = target.split(b"?", 1)[0]
        self.request_headers = Headers(headers or {})
        self.response_headers = Headers()
        self.started = started
        self.status = 200
        self.phrase = b"OK"
        self.head_sent = False
        self.finished = False
        self.written: list[bytes] = []
        self.producer: IProducer | None = None
        self.aborted = False
        self._secure = secure
        self._client = (IPv6Address if ":" in client else IPv4Address)("TCP", client, 40000)
        # What the borrowed methods below read and set.
        self._disconnected = False
        self._waiters: list[defer.Deferred[None]] = []
        self._body_waiter: defer.Deferred[bytes] | None = None

    def is_secure(self) -> bool:
        return self._secure

    def client_address(self) -> IAddress:
        return self._client

    def peer_host(self) -> str:
        return str(self._client.host)

    def write(self, data: bytes) -> None:
        if self.finished or self._disconnected:
            return
        self.head_sent = True
        if data:
            self.written.append(data)

    def finish(self) -> None:
        if self.finished or self._disconnected:
            return
        self.head_sent = True
        self.finished = True
        self.producer = None
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    # The real request's own where no connection is involved: the status and headers it keeps, and
    # whoever waits on the end of a response, behave the same in tests.
    set_status = ProxyRequest.set_status
    set_header = ProxyRequest.set_header
    respond = ProxyRequest.respond
    when_finished = ProxyRequest.when_finished
    connection_lost = ProxyRequest.connection_lost

    def abort(self) -> None:
        self.aborted = True

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        assert streaming, "only push producers are registered on a request"
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None
