"""The service manager's readiness protocol (sd_notify(3)), spoken by ourselves.

systemd (`Type=notify`) passes the path of a datagram socket in `$NOTIFY_SOCKET`; each message is one
datagram of newline-separated `NAME=value` lines. A path starting with `@` names a socket in the
abstract namespace. Without the variable nothing is sent, so the daemon behaves the same outside
systemd. No library is needed for one `sendto`, and libsystemd's Python binding is not on PyPI.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

from twisted.logger import Logger

log = Logger()


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, the clock systemd compares `MONOTONIC_USEC` against."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Sends notify messages to the service manager, if there is one listening."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self.address: str | bytes | None = None
        if path.startswith("@"):
            self.address = b"\0" + path[1:].encode()
        elif path.startswith("/"):
            self.address = path
        elif path:
            log.warn("NOTIFY_SOCKET={path!r} is neither a path nor an abstract name: not notifying", path=path)
        self._failing = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str | int) -> bool:
        """One message: `send(READY=1, STATUS="listening")`. True when the manager took it."""
        if self.address is None:
            return False
        message = "\n".join(f"{name}={_one_line(str(value))}" for name, value in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)  # never wait on the manager from the reactor thread
                sock.sendto(message, self.address)
        except OSError as e:
            if not self._failing:
                log.warn("service manager notification failed: {error}", error=e.strerror or str(e))
            self._failing = True
            return False
        if self._failing:
            log.info("service manager notifications are delivered again")
        self._failing = False
        return True

    def ready(self, status: str) -> None:
        # No MAINPID: the process systemd started is its main process already, and a successor's
        # own MAINPID would be ignored (NotifyAccess=main): its predecessor names it (`hand_over`).
        self.send(READY=1, STATUS=status)

    def hand_over(self, pid: int, status: str) -> None:
        """`pid` (a successor, serving on our listening socket) is the service's main process from
        now on. Only the main process may say so under `NotifyAccess=main`: this one, which
        systemd started or was named by its own predecessor. Then this process is silent: what
        it would say while it drains and exits (STOPPING=1) is not the service's state."""
        self.send(MAINPID=pid, STATUS=status)
        self.address = None

    def reloading(self, status: str) -> None:
        self.send(RELOADING=1, MONOTONIC_USEC=monotonic_usec(), STATUS=status)

    def stopping(self, status: str) -> None:
        self.send(STOPPING=1, STATUS=status)

    def status(self, status: str) -> None:
        self.send(STATUS=status)


def _one_line(value: str) -> str:
    # A newline would start a new assignment inside the message.
    return value.replace("\r", " ").replace("\n", " ")
