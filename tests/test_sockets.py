"""Writes sent on the socket at once when nothing is queued, queued as Twisted would otherwise."""

from __future__ import annotations

from twisted.internet.testing import StringTransport

from ccproxy.http.sockets import send_now
from tests.support.fake_tcp import FakeSocket
from tests.support.fake_tcp import TcpConnection as Conn


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
