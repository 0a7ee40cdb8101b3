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
    except (FileNotFoundError, ProcessLookupError):
        # Reaped between the two looks: /proc answers ESRCH on read.
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


def connect(d: Daemon, timeout: float = 20.0) -> http.client.HTTPConnection:
    if d.tls:
        return http.client.HTTPSConnection(d.host, d.port, timeout=timeout, context=d.ssl_context())
    return http.client.HTTPConnection(d.host, d.port, timeout=timeout)


def which_worker(conn: http.client.HTTPConnection) -> int:
    """The worker serving this (kept-alive) connection, from its /ready answer."""
    conn.request("GET", "/ready")
    response = conn.getresponse()
    body = response.read()
    assert response.status == 200, (response.status, body)
    index: int = json.loads(body)["worker"]
    return index


def parallel(calls: list[Callable[[], Any]], timeout: float = 60.0) -> list[Any]:
    """Run `calls` on a thread each, released together; their results (or exceptions) in order."""
    results: list[Any] = [None] * len(calls)
    barrier = threading.Barrier(len(calls))

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = calls[i]()
        except Exception as e:
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return results


def spread_connections(d: Daemon, count: int, workers: int = 2, timeout: float = 60.0
                       ) -> list[tuple[int, http.client.HTTPConnection]]:
    """`count` open connections, each labelled with the worker that accepted it, at least a quarter
    of them on each worker (connections are opened together until the kernel has spread them)."""
    held: dict[int, list[http.client.HTTPConnection]] = {}
    deadline = time.monotonic() + timeout
    while True:
        batch = [connect(d) for _ in range(8)]
        for conn, worker in zip(batch, parallel([lambda c=c: which_worker(c) for c in batch]), strict=True):  # type: ignore[misc]
            assert isinstance(worker, int), worker
            held.setdefault(worker, []).append(conn)
        need = count // (2 * workers)
        if len(held) == workers and all(len(c) >= need for c in held.values()) \
                and sum(len(c) for c in held.values()) >= count:
            break
        assert time.monotonic() < deadline, {w: len(c) for w, c in held.items()}
    out: list[tuple[int, http.client.HTTPConnection]] = []
    # Take from each worker in turn, so both hold a share; close the connections not used.
    queues = {w: list(c) for w, c in held.items()}
    while len(out) < count:
        for w, q in queues.items():
            if q and len(out) < count:
                out.append((w, q.pop()))
    for q in queues.values():
        for conn in q:
            conn.close()
    return out
