"""Socket-level tuning shared by both hops: no Nagle delay, and writes sent at once.

Twisted queues every write and sends it on the next reactor turn, registering the socket for
writability and unregistering it again: two `epoll_ctl` calls and a reactor turn per write. A proxy
writes each response (and each upstream request) in one piece, usually onto a socket with nothing
queued, so `send_now` tries the socket first and queues only what the kernel did not take.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp

from ccproxy._compat import tcp_queued_bytes, tcp_write_queue_empty


def no_delay(transport: object) -> None:
    """Send small writes (an SSE event, a response head) at once instead of waiting on Nagle's
    algorithm for the previous segment's ACK, which costs up to ~40 ms per event."""
    while transport is not None:
        set_no_delay = getattr(transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
            return
        transport = getattr(transport, "transport", None)  # TLS: the TCP transport beneath


def send_now(transport: Any, data: bytes) -> None:
    """`transport.write(data)`, but sent on the socket at once when nothing is queued before it."""
    if data and _idle_tcp(transport):
        try:
            sent = transport.socket.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            sent = 0  # the queued write below meets the same error and closes the connection
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


def _idle_tcp(transport: Any) -> bool:
    # Only a plain TCP connection with an empty queue: otherwise order or TLS state would suffer.
    return bool(
        isinstance(transport, tcp.Connection)
        and not transport.TLS
        and transport.connected
        and not transport.disconnecting
        and tcp_write_queue_empty(transport)
    )


def queued_bytes(transport: Any) -> int | None:
    """Bytes written to the TCP connection under `transport` (through TLS and wrappers) that the
    kernel has not taken yet; None when there is no TCP connection to ask."""
    while transport is not None and not isinstance(transport, tcp.Connection):
        transport = getattr(transport, "transport", None)
    if transport is None:
        return None
    return tcp_queued_bytes(transport)
