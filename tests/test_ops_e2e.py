"""The real daemon as a service manager sees it: readiness notifications, reloads, and a graceful drain."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ccproxy.audit.verify import verify
from tests.support.daemon import Daemon
from tests.support.upstream import FakeUpstream, Script, anthropic_stream

HMAC_KEY = "ops-e2e-hmac-key-0a1b2c3d4e5f60718293a4b5c6d7e8f9"
# twistd ends by re-raising the signal that stopped it; systemd counts SIGTERM as a clean stop.
STOPPED = -signal.SIGTERM
BODY = json.dumps({"model": "claude-sonnet-4-6", "max_tokens": 16, "stream": True,
                   "messages": [{"role": "user", "content": "hi"}]}).encode()


def _audit(tmp: Path, drain: str = "30s") -> dict[str, Any]:
    return {
        "server": {"drain_timeout": drain},
        "security": {"audit": {"hmac_key": "${CCPROXY_AUDIT_HMAC_KEY}", "outputs": [
            {"type": "file", "path": str(tmp / "audit.log"), "flush_interval": "50ms"},
            {"type": "file", "path": str(tmp / "access.log"), "records": "access", "flush_interval": "50ms"},
        ]}},
    }


def _env() -> dict[str, str]:
    return {"CCPROXY_AUDIT_HMAC_KEY": HMAC_KEY}


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _wait(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.02)


class Stream:
    """One streamed Messages request, read event by event on a thread."""

    def __init__(self, d: Daemon) -> None:
        self.conn = http.client.HTTPSConnection(d.host, d.port, context=d.ssl_context(), timeout=60)
        self.events: list[str] = []
        self.first = threading.Event()
        self.error: BaseException | None = None
        self.headers: dict[str, str] = {}
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.conn.request("POST", "/v1/messages", BODY, {"content-type": "application/json",
                                                             "x-api-key": "sk-ant-client-key-000000000000f3a9",
                                                             "anthropic-version": "2023-06-01"})
            response = self.conn.getresponse()
            self.headers = {k.lower(): v for k, v in response.getheaders()}
            while True:
                line = response.readline()
                if not line:
                    break
                if line.startswith(b"event: "):
                    self.events.append(line[7:].strip().decode())
                    self.first.set()
        except BaseException as e:  # reported by the test
            self.error = e
        finally:
            self.first.set()
            self.conn.close()


def _refused(d: Daemon) -> bool:
    try:
        socket.create_connection((d.host, d.port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_ten_streams_survive_sigterm_while_new_connections_are_refused(
        daemon: Callable[..., Daemon], upstream: FakeUpstream, tmp_path: Path) -> None:
    release = threading.Event()

    def hold(i: int) -> None:
        if i >= 1:  # the first event goes out at once; the rest wait for the test
            release.wait(30)

    upstream.expect(*[Script(headers={"content-type": "text/event-stream"},
                             events=anthropic_stream(["one", "two", "three"]), before_event=hold)
                      for _ in range(10)])
    d = daemon(_audit(tmp_path), env=_env())
    # A kept-alive connection with nothing under way is closed at once by the drain.
    idle = http.client.HTTPSConnection(d.host, d.port, context=d.ssl_context(), timeout=10)
    idle.request("GET", "/health")
    assert idle.getresponse().read() == b'{"status":"ok"}'
    streams = [Stream(d) for _ in range(10)]
    for s in streams:
        assert s.first.wait(20) and s.events == ["message_start"], s.error
    assert d.proc is not None
    d.proc.send_signal(signal.SIGTERM)
    _wait(lambda: _refused(d), 10)
    assert idle.sock is not None and idle.sock.recv(1) == b""  # closed by the server
    assert d.proc.poll() is None  # still serving the streams
    release.set()
    for s in streams:
        s.thread.join(30)
        assert s.error is None
        assert s.events[-1] == "message_stop" and len(s.events) == 9
    assert d.proc.wait(20) == STOPPED
    access = _records(tmp_path / "access.log")
    assert sum(1 for r in access if r.get("path") == "/v1/messages" and r.get("status") == 200) == 10
    assert verify([str(tmp_path / "access.log")], HMAC_KEY.encode()).ok
    assert "finished during the drain" in d.log()

    # The chains carry on across the restart.
    before = len(access)
    d.start()
    assert d.get("/v1/models").status == 200
    assert d.stop() == STOPPED
    access = _records(tmp_path / "access.log")
    assert len(access) > before and access[-1]["path"] == "/v1/models"
    assert [r["seq"] for r in access] == list(range(access[0]["seq"], access[0]["seq"] + len(access)))
    assert verify([str(tmp_path / "access.log")], HMAC_KEY.encode()).ok


@pytest.mark.parametrize("second_signal", [False, True], ids=["drain_timeout", "second_sigterm"])
def test_streams_that_overstay_drain_timeout_are_cut_and_recorded(
        daemon: Callable[..., Daemon], upstream: FakeUpstream, tmp_path: Path, second_signal: bool) -> None:
    never = threading.Event()
    upstream.expect(*[Script(headers={"content-type": "text/event-stream"}, events=anthropic_stream(["x"]),
                             before_event=lambda i: i >= 1 and never.wait(60)) for _ in range(2)])
    d = daemon(_audit(tmp_path, drain="60s" if second_signal else "1s"), env=_env())
    streams = [Stream(d) for _ in range(2)]
    for s in streams:
        assert s.first.wait(20), s.error
    assert d.proc is not None
    started = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    if second_signal:
        _wait(lambda: _refused(d), 10)  # draining
        d.proc.send_signal(signal.SIGTERM)  # an impatient operator: cut now, not in 60s
    assert d.proc.wait(20) == STOPPED
    took = time.monotonic() - started
    never.set()
    if not second_signal:
        assert took >= 1.0  # the drain waited its whole timeout first
    for s in streams:
        s.thread.join(10)
        assert s.events[-1] != "message_stop"
    cut = [r for r in _records(tmp_path / "audit.log")
           if r.get("event") == "request_timeout" and r.get("reason") == "drain_timeout"]
    assert len(cut) == 2 and {r["path"] for r in cut} == {"/v1/messages"}
    access = [r for r in _records(tmp_path / "access.log") if r.get("path") == "/v1/messages"]
    assert {r["request_id"] for r in access} == {r["request_id"] for r in cut}
    assert verify([str(tmp_path / "audit.log")], HMAC_KEY.encode()).ok
    assert verify([str(tmp_path / "access.log")], HMAC_KEY.encode()).ok
    assert "were cut" in d.log()


class NotifySocket:
    """A service manager's end of the notify protocol: a bound datagram socket."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(20)

    def next(self) -> dict[str, str]:
        data = self.sock.recv(4096)
        return dict(line.split("=", 1) for line in data.decode().split("\n"))

    def until(self, name: str) -> list[dict[str, str]]:
        seen = []
        while True:
            message = self.next()
            seen.append(message)
            if name in message:
                return seen


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notify_ready_reloading_stopping_in_order(daemon: Callable[..., Daemon], tmp_path: Path,
                                                  abstract: bool) -> None:
    if abstract:
        name = f"ccproxy-test-notify-{time.monotonic_ns()}"
        manager = NotifySocket(b"\0" + name.encode())
        env = {"NOTIFY_SOCKET": "@" + name}
    else:
        path = str(tmp_path / "notify.sock")
        manager = NotifySocket(path)
        env = {"NOTIFY_SOCKET": path}
    d = daemon({}, env=env)
    assert d.proc is not None
    ready = manager.until("READY")[-1]
    # No MAINPID: systemd knows the pid of the process it started (see `Notifier.hand_over`).
    assert ready["READY"] == "1" and "MAINPID" not in ready
    assert ready["STATUS"] == f"listening on {d.url}"

    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    d.reload(d.config)
    reloading = manager.next()
    assert reloading["RELOADING"] == "1"
    assert before <= int(reloading["MONOTONIC_USEC"]) <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    after = manager.next()
    assert after["READY"] == "1" and "config reloaded" in after["STATUS"]

    d.reload("server: [not, a, mapping\n")
    assert "RELOADING" in manager.next()
    refused = manager.next()
    assert refused["READY"] == "1" and "refused" in refused["STATUS"]

    d.proc.send_signal(signal.SIGTERM)
    stopping = manager.until("STOPPING")[-1]
    assert stopping["STOPPING"] == "1" and "draining" in stopping["STATUS"]
    assert d.proc.wait(20) == STOPPED
