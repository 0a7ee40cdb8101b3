"""Writes sent on the socket at once when nothing is queued, queued as Twisted would otherwise."""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp
from twisted.internet.testing import StringTransport

from ccproxy.http.sockets import send_now


class FakeSocket:
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


class Conn(tcp.Connection):
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


def test_idle_socket_takes_the_write_at_once() -> None:
    conn = Conn(FakeSocket())
    send_now(conn, b"HTTP/1.1 200 OK\r\n\r\n")
    assert conn.socket.sent == [b"HTTP/1.1 200 OK\r\n\r\n"] and conn.queued == []


def test_what_the_kernel_does_not_take_is_queued_in_order() -> None:
    conn = Conn(FakeSocket(takes=4))
    send_now(conn, b"abcdefgh")
    assert conn.socket.sent == [b"abcd"] and conn.queued == [b"efgh"]
    send_now(conn, b"ijkl")  # something is queued now: this must wait behind it
    assert conn.socket.sent == [b"abcd"] and conn.queued == [b"efgh", b"ijkl"]


def test_a_full_or_failing_socket_leaves_the_write_to_twisted() -> None:
    for error in (BlockingIOError, ConnectionResetError):
        conn = Conn(FakeSocket(error=error))
        send_now(conn, b"data")
        assert conn.queued == [b"data"]


def test_closing_or_other_transports_are_written_as_usual() -> None:
    closing = Conn(FakeSocket())
    closing.disconnecting = True
    send_now(closing, b"late")
    assert closing.socket.sent == [] and closing.queued == [b"late"]
    plain = StringTransport()
    send_now(plain, b"x")
    assert plain.value() == b"x"
