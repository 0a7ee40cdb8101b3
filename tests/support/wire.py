"""In-memory doubles for driving HTTP client connections: an endpoint onto StringTransports and a
body protocol that keeps what it is given."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone


class Endpoint:
    """Connects at once to a StringTransport and remembers every connection made; it is its own
    endpoint factory, for `Agent.usingEndpointFactory`."""

    def __init__(self) -> None:
        self.connections: list[tuple[Any, StringTransport]] = []

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.connections.append((protocol, transport))
        return defer.succeed(protocol)

    def endpointForURI(self, uri: Any) -> Endpoint:
        return self

    @property
    def protocol(self) -> Any:
        return self.connections[-1][0]


class Body(Protocol):
    """Keeps the body it is given and how it ended."""

    def __init__(self) -> None:
        self.data = b""
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        self.reason = reason


class _Site:
    clock = Clock()

    def trusted(self) -> None:
        return None

    def log(self, request: Any) -> None:
        pass

    def completed(self, request: Any) -> None:
        pass


class FakeChannel:
    """What a ProxyRequest needs of its channel: a StringTransport to write to, a site that logs
    nothing and trusts no proxy."""

    persistent = True
    secure = True

    def __init__(self) -> None:
        self.transport = StringTransport()
        self.site = _Site()

    def request_done(self, request: Any) -> None:
        pass

    def answering(self, request: Any) -> None:
        pass
