"""Helpers for tests of socket activation, restarts and workers: passing a listening socket as
systemd does, a steady stream of requests, and reading which worker answered."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from tests.support.daemon import Daemon

# What systemd does between fork and exec: the socket at descriptor 3, LISTEN_PID set to the pid of
# the process that then runs (exec keeps the pid). LISTEN_FDS and LISTEN_FDNAMES come in the env.
ACTIVATE = (
    "import os, sys; fd = int(sys.argv[1]); os.dup2(fd, 3); fd != 3 and os.close(fd); "
    "os.environ['LISTEN_PID'] = str(os.getpid()); os.execv(sys.executable, [sys.executable, *sys.argv[2:]])"
)


def listening_socket(host: str = "127.0.0.1", backlog: int = 128) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.bind((host, 0))
    sock.listen(backlog)
    return sock


def activate(d: Daemon, sock: socket.socket, name: str = "ccproxy") -> None:
    """Start `d` (not yet started) with `sock` passed as systemd's socket activation passes it."""
    d.prefix = [sys.executable, "-c", ACTIVATE, str(sock.fileno())]
    d.pass_fds = (sock.fileno(),)
    d.env.update({"LISTEN_FDS": "1", "LISTEN_FDNAMES": name})
    d.port = sock.getsockname()[1]


def request(d: Daemon, path: str, method: str = "GET", timeout: float = 10.0) -> tuple[int, bytes]:
    """One request on a connection of its own."""
    if d.tls:
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            d.host, d.port, timeout=timeout, context=d.ssl_context())
    else:
        conn = http.client.HTTPConnection(d.host, d.port, timeout=timeout)
    try:
        conn.request(method, path, headers={"x-api-key": "client-key", "anthropic-version": "2023-06-01"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def ready(d: Daemon) -> dict[str, Any]:
    status, body = request(d, "/ready")
    assert status == 200, (status, body)
    info: dict[str, Any] = json.loads(body)
    return info


class Stream:
    """Requests one after another on `threads` threads, each on a new connection, until stopped;
    records every failure (an exception, or a status other than 200)."""

    def __init__(self, d: Daemon, paths: list[str], threads: int = 4) -> None:
        self.d = d
        self.paths = paths
        self.done = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def __enter__(self) -> Stream:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def _run(self, i: int) -> None:
        n = 0
        while not self._stop.is_set():
            path = self.paths[(i + n) % len(self.paths)]
            n += 1
            try:
                status, body = request(self.d, path)
                failure = None if status == 200 else f"{path}: {status} {body[:200]!r}"
            except Exception as e:
                failure = f"{path}: {type(e).__name__}: {e}"
            with self._lock:
                self.done += 1
                if failure is not None:
                    self.failures.append(failure)

    def count(self) -> int:
        with self._lock:
            return self.done


def wait_for(what: Callable[[], Any], timeout: float = 30.0, step: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {what}")


def log_match(d: Daemon, pattern: str) -> list[re.Match[str]]:
    return list(re.finditer(pattern, d.log()))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def terminate(pid: int, timeout: float = 15.0) -> None:
    """Stop a process this test started indirectly (a successor), by its pid."""
    if not alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    try:
        wait_for(lambda: not alive(pid), timeout)
    except AssertionError:
        os.kill(pid, signal.SIGKILL)
