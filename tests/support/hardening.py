"""In-memory harness for the hardened channel: a Site with a recording resource, driven by bytes."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from ccproxy.config.network import DDoSConfig, NetworkConfig
from ccproxy.errors import ANTHROPIC, ApiError, error_body
from ccproxy.http.request import ProxyRequest
from ccproxy.site import ProxySite


class Recorder(Resource):
    """Answers `ok <body length>`; `hold=True` keeps requests open (a long response)."""

    isLeaf = True

    def __init__(self, hold: bool = False) -> None:
        super().__init__()
        self.seen: list[tuple[bytes, bytes, bytes]] = []
        self.hold = hold
        self.open: list[ProxyRequest] = []

    def render(self, request: Any) -> Any:
        request.read_body().addCallbacks(lambda body: self.answer(request, body), self.refused, errbackArgs=(request,))
        return NOT_DONE_YET

    def refused(self, failure: Any, request: Any) -> None:
        # The body could not be taken in: an ApiError is answered in the API's shape, as ccproxy does.
        if failure.check(ApiError):
            error = failure.value
            request.set_status(error.status)
            for name, value in error.headers.items():
                request.set_header(name.encode(), value.encode())
            request.respond(error_body(ANTHROPIC, error))

    def answer(self, request: Any, body: bytes) -> None:
        self.seen.append((request.method, request.target, body))
        if self.hold:
            self.open.append(request)
            return
        request.respond(b"ok %d" % len(body))


class Conn:
    def __init__(self, config: NetworkConfig | None = None, resource: Resource | None = None,
                 peer: str = "127.0.0.1") -> None:
        self.clock = Clock()
        self.resource = resource if resource is not None else Recorder()
        self.site = ProxySite(self.resource, self.clock)
        cfg = config if config is not None else NetworkConfig()
        self.site.network = lambda: cfg
        addr = IPv4Address("TCP", peer, 40000)
        self.channel = self.site.buildProtocol(addr)
        self.transport = StringTransport(peerAddress=addr)
        self.channel.makeConnection(self.transport)

    def send(self, data: bytes) -> Conn:
        self.channel.dataReceived(data)
        return self

    @property
    def output(self) -> bytes:
        return self.transport.value()

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)

    def status(self) -> int | None:
        out = self.output
        if not out.startswith(b"HTTP/1.1 "):
            return None
        return int(out[9:12])


def config(**ddos: Any) -> NetworkConfig:
    return NetworkConfig(ddos=DDoSConfig(**ddos))
