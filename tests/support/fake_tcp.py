"""A Twisted TCP transport over a fake socket: the state Twisted keeps, with no reactor or kernel."""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp


class FakeSocket:
    """Takes `takes` bytes of each send (all of them by default), or raises `error`."""

    def __init__(self, takes: int | None = None, error: type[Exception] | None = None) -> None:
        self.sent: list[bytes] = []
        self.takes = takes
        self.error = error

    def send(self, data: bytes) -> int:
        if self.error is not None:
            raise self.error()
        taken = data if self.takes is None else data[: self.takes]
        self.sent.append(bytes(taken))
        return len(taken)


class TcpConnection(tcp.Connection):
    """A TCP transport in the state Twisted keeps, without a reactor behind it."""

    def __init__(self, sock: FakeSocket) -> None:  # no super().__init__: no real socket or reactor
        self.socket: Any = sock
        self.TLS = False
        self.connected = True
        self.disconnecting = False
        self._writeDisconnected = False
        self._tempDataBuffer: list[bytes] = []
        self._tempDataLen = 0
        self.dataBuffer = b""
        self.offset = 0
        self.queued: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.queued.append(data)
        self._tempDataBuffer.append(data)
