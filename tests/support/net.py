"""Raw loopback sockets against a running daemon: connections refused at accept, the server's view."""

from __future__ import annotations

import select
import socket
from typing import Any


def tcp(d: Any, source: str | None = None, timeout: float = 5.0) -> socket.socket:
    """A plain TCP connection to daemon `d`, from loopback address `source` if given."""
    return socket.create_connection(("127.0.0.1", d.port), timeout=timeout,
                                    source_address=(source, 0) if source else None)


def refused(s: socket.socket, wait: float = 2.0) -> bool:
    """True if the server closed this connection without sending a byte (no TLS, no HTTP): what a
    refusal at accept looks like. False if the server was still waiting for the client after `wait`."""
    s.settimeout(wait)
    try:
        return s.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    finally:
        s.close()


def still_open(s: socket.socket) -> bool:
    readable, _, _ = select.select([s], [], [], 0.3)
    return not readable


def server_connections(port: int) -> int:
    """How many TCP connections the local server on `port` holds open (established, or closed by the
    peer and not yet by the server), in the kernel's view: a test waits on it for the server to close
    one. A connection still in the accept queue counts too."""
    open_states = {"01", "08"}  # ESTABLISHED, CLOSE_WAIT
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for row in rows:
            fields = row.split()
            local, state = fields[1], fields[3]
            if int(local.rsplit(":", 1)[1], 16) == port and state in open_states:
                count += 1
    return count
