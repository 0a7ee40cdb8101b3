"""The supervisor's decisions on a task.Clock, its workers stood in for by channels and processes that
record what they are told: what each worker message does, the restart backoff, reloads sent to every
worker or none, and draining (killing what overstays)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, task
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from ccproxy.config import load
from ccproxy.workers.drain import kill_after
from ccproxy.workers.supervisor import FIRST_BACKOFF, MAX_BACKOFF, STABLE_AFTER, Supervisor

CONFIG = """\
server:
  host: 127.0.0.1
  port: 0
  workers: 2
  drain_timeout: 5s
  tls: {enabled: false}
admin: {enabled: false}
"""


class Channel:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def send(self, op: str, **fields: Any) -> None:
        self.sent.append((op, fields))

    def ops(self) -> list[str]:
        return [op for op, _ in self.sent]


class Process:
    def __init__(self, pid: int, gone: bool = False) -> None:
        self.pid = pid
        self.gone = gone
        self.signals: list[str] = []

    def signalProcess(self, name: str) -> None:
        if self.gone:
            raise OSError("No such process")
        self.signals.append(name)


@pytest.fixture
def logged() -> Iterator[list[str]]:
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "ccproxy.workers.supervisor":
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[tuple[Supervisor, task.Clock, Path]]:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    clock = task.Clock()
    s = Supervisor(str(path), load(str(path)), clock, argv=["-n", "ccproxy", "--config", str(path)])
    for i, slot in enumerate(s.slots):  # as spawn() leaves them, without starting processes
        slot.process, slot.channel, slot.last_pid = Process(100 + i), Channel(), 100 + i
        slot.ended = defer.Deferred()
    yield s, clock, path


def channel(s: Supervisor, index: int) -> Channel:
    c = s.slots[index].channel
    assert isinstance(c, Channel)
    return c


def test_decide_admit_and_release_are_answered_to_the_worker_that_asked(supervisor: Any) -> None:
    s, _, _ = supervisor
    first = s.slots[0]
    s.message(first, {"op": "admit", "id": 7, "items": [["192.0.2.1", 1, None], ["192.0.2.2", 1, None]]})
    assert channel(s, 0).sent == [("admitted", {"id": 7, "answers": [None, "too_many_connections"]})]
    s.message(first, {"op": "release", "hosts": ["192.0.2.1"]})
    s.message(first, {"op": "admit", "id": 8, "items": [["192.0.2.2", 1, None]]})
    assert channel(s, 0).sent[-1] == ("admitted", {"id": 8, "answers": [None]})
    s.message(first, {"op": "decide", "id": 9, "items": []})
    assert channel(s, 0).sent[-1] == ("decided", {"id": 9, "answers": []})
    assert channel(s, 1).sent == []  # the other worker hears nothing of it


def test_readiness_is_broadcast_and_a_refused_reload_is_logged(supervisor: Any, logged: list[str]) -> None:
    s, _, _ = supervisor
    s.message(s.slots[0], {"op": "ready"})
    assert [c.sent[-1] for c in (channel(s, 0), channel(s, 1))] == [("status", {"ready": 1, "configured": 2})] * 2
    assert not s.announced
    s.message(s.slots[1], {"op": "ready"})
    assert s.announced and channel(s, 1).sent[-1] == ("status", {"ready": 2, "configured": 2})
    assert "worker 2 (pid 101) ready; 2 of 2 workers ready" in logged
    s.message(s.slots[1], {"op": "reloaded", "ok": False})
    s.message(s.slots[0], {"op": "reloaded", "ok": True})
    assert [line for line in logged if "reload" in line] == ["worker 2 (pid 101) refused the reload"]


def test_a_worker_that_dies_is_restarted_after_a_delay_that_doubles(
        supervisor: Any, logged: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    s, clock, _ = supervisor
    spawned: list[int] = []

    def spawn(slot: Any) -> None:  # what a restart would start: recorded, not a process
        spawned.append(slot.index)
        slot.process, slot.channel, slot.started_at = Process(200 + len(spawned)), Channel(), clock.seconds()

    monkeypatch.setattr(s, "spawn", spawn)
    slot = s.slots[0]
    s.message(slot, {"op": "ready"})
    delays = []
    for _ in range(9):
        ended = slot.ended
        s.worker_ended(slot, Failure(ProcessTerminated(signal=9)))
        assert ended is None or ended.called
        call = slot.restart
        delays.append(call.getTime() - clock.seconds())
        clock.advance(delays[-1])
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]  # doubling from 0.5 s, at most 30 s
    assert (FIRST_BACKOFF, MAX_BACKOFF) == (0.5, 30.0)
    assert spawned == [1] * 9
    assert f"worker 1 (pid 100) died (signal 9); 0 of 2 workers ready; restarting it in {FIRST_BACKOFF:g} s" in logged
    assert channel(s, 1).sent[-1] == ("status", {"ready": 0, "configured": 2})
    clock.advance(STABLE_AFTER)  # it served a minute: its next death starts the backoff again
    s.worker_ended(slot, Failure(ProcessDone(0)))
    assert slot.restart.getTime() - clock.seconds() == FIRST_BACKOFF
    assert logged[-1].startswith("worker 1 (pid 100) died (exit code 0);")


def test_reload_sends_the_checked_text_to_every_live_worker(supervisor: Any, logged: list[str]) -> None:
    s, _, path = supervisor
    text = CONFIG.replace("drain_timeout: 5s", "drain_timeout: 7s")
    path.write_text(text)
    s.slots[1].channel = None  # between a death and its restart
    assert s.reload() is True
    assert channel(s, 0).sent == [("reload", {"text": text, "path": str(path)})]
    assert s.config.server.drain_timeout == 7.0 and logged[-1] == "config checked; sent to 1 workers"


@pytest.mark.parametrize(("content", "message"), [
    (None, "config reload refused, still serving the previous config: cannot read "),
    (b"\xff\xfe not text", "config reload refused, still serving the previous config: cannot read "),
    (b"server: [", "config reload refused by the supervisor; no worker reloads: "),
    (CONFIG.replace("workers: 2", "workers: 3").encode(),
     "config reload refused by the supervisor; no worker reloads: server.workers: cannot change on reload"),
])
def test_a_config_the_supervisor_refuses_reaches_no_worker(
        supervisor: Any, logged: list[str], content: bytes | None, message: str) -> None:
    s, _, path = supervisor
    before = s.config
    if content is None:
        path.unlink()
    else:
        path.write_bytes(content)
    assert s.reload() is False
    assert s.config is before and channel(s, 0).sent == channel(s, 1).sent == []
    assert logged[-1].startswith(message), logged[-1]


def test_drain_tells_workers_to_drain_and_kills_those_that_overstay(supervisor: Any, logged: list[str]) -> None:
    s, clock, _ = supervisor
    first, second = s.slots
    second.channel = None  # its channel is gone: it is asked with SIGTERM instead
    restart = clock.callLater(30, lambda: None)
    first.restart = restart
    done = s.drain_all()
    assert not restart.active()
    assert channel(s, 0).ops() == ["drain"] and second.process.signals == ["TERM"]
    clock.advance(kill_after(5.0) - 1)
    assert not done.called and first.process.signals == []
    second.process.gone = True  # exited, its end not yet reported: signalling it is no error
    clock.advance(1)
    assert first.process.signals == ["KILL"] and second.process.signals == ["TERM"]
    assert "worker 1 (pid 100) did not exit after draining; killing it" in logged
    s.worker_ended(second, Failure(ProcessDone(0)))
    assert not done.called and "worker 2 (pid 101) exited" in logged
    s.worker_ended(first, Failure(ProcessTerminated(signal=9)))
    assert done.called and clock.getDelayedCalls() == []  # stopping: nothing restarts


def test_a_block_decided_by_the_supervisor_reaches_every_live_worker(supervisor: Any) -> None:
    s, _, _ = supervisor
    s.slots[1].channel = None
    s.announce_block("192.0.2.9", 1060.0)
    assert channel(s, 0).sent == [("block", {"ip": "192.0.2.9", "until": 1060.0})]


def test_drain_with_no_worker_running_is_done_at_once(supervisor: Any) -> None:
    s, clock, _ = supervisor
    for slot in s.slots:
        slot.process = slot.ended = None
    done = s.drain_all()
    assert done.called and clock.getDelayedCalls() == []
