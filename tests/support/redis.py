"""A real redis-server on a free loopback port, for the tests of the Redis backend."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support.daemon import free_port


class RedisServer:
    """`start()` runs redis-server without persistence; `kill()` and `start()` again (same port)
    simulate an outage."""

    def __init__(self, tmp: Path | None = None, port: int | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (Debian: apt-get install redis-server)")
        self.binary = binary
        # Without a folder from the test, one of its own outside the work tree, removed by stop().
        self._own_tmp = tmp is None
        self.tmp = Path(tempfile.mkdtemp(prefix="ccproxy-redis-")) if tmp is None else tmp
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.tmp)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            if self.ping():
                return self
            time.sleep(0.02)
        raise RuntimeError("redis-server did not answer PING")

    def ping(self) -> bool:
        return self.command("PING") == b"+PONG\r\n"

    def command(self, *args: str) -> bytes:
        """One raw RESP command (blocking; for test setup only)."""
        payload = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(payload.encode())
                return s.recv(65536)
        except OSError:
            return b""

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open, nothing is answered."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        self.kill()
        if self._own_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)


class ClassRedis:
    """Mixed into a trial TestCase: one redis-server for the class, running (again, if a test killed
    it) and empty at the start of each test."""

    server: RedisServer

    @classmethod
    def setUpClass(cls) -> None:
        cls.server = RedisServer().start()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.server.stop()

    def setUp(self) -> None:
        if self.server.proc is None:
            self.server.start()
        self.server.command("FLUSHALL")
        super().setUp()  # type: ignore[misc]  # the TestCase it is mixed into
