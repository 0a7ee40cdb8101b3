"""Fast tests of socket activation parsing, the handover's decisions and `server.workers`."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from twisted.internet import task
from twisted.python.failure import Failure

from ccproxy.config import ConfigError, parse
from ccproxy.config.workers import usable_cpus
from ccproxy.notify import Notifier
from ccproxy.service import _check_restart_only, changed_paths
from ccproxy.workers import activation, handover
from ccproxy.workers.activation import ActivationError, Inherited
from ccproxy.workers.drain import retire
from tests.support.manager import FakeManager


def _env(**extra: str) -> dict[str, str]:
    return {"PATH": "/bin", **extra}


def test_inherited_descriptors_for_this_process_with_their_names() -> None:
    env = _env(LISTEN_FDS="2", LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES="ccproxy:admin")
    assert activation.inherited(env) == [Inherited(3, "ccproxy"), Inherited(4, "admin")]
    assert env == _env()  # taken once: a process started later does not see them


def test_descriptors_meant_for_another_process_are_not_taken() -> None:
    env = _env(LISTEN_FDS="1", LISTEN_PID=str(os.getpid() + 1), LISTEN_FDNAMES="ccproxy")
    assert activation.inherited(env) == []


def test_no_activation_without_the_variables() -> None:
    assert activation.inherited(_env()) == []


def test_pick_takes_the_named_socket_or_the_only_one() -> None:
    assert activation.pick([Inherited(3, "other"), Inherited(4, "ccproxy")]) == 4
    assert activation.pick([Inherited(3, "unknown")]) == 3
    with pytest.raises(ActivationError, match="not exactly one named 'ccproxy'"):
        activation.pick([Inherited(3, "a"), Inherited(4, "b")])


def test_describe_refuses_what_is_not_a_listening_tcp_socket() -> None:
    with socket.socket() as idle, socket.socket(type=socket.SOCK_DGRAM) as udp:
        with pytest.raises(ActivationError, match="not listening"):
            activation.describe(idle.fileno())
        with pytest.raises(ActivationError, match="not a TCP socket"):
            activation.describe(udp.fileno())
    with activation.bind("127.0.0.1", 0) as sock:
        family, (host, port) = activation.describe(sock.fileno())
        assert (family, host, port) == (socket.AF_INET, "127.0.0.1", sock.getsockname()[1])
        assert not sock.getblocking()  # every process accepting on it must not block in accept()


def test_successor_runs_without_the_pidfile() -> None:
    argv = ["-n", "--pidfile", "/run/ccproxy.pid", "--syslog", "ccproxy", "--config", "c.yaml"]
    assert handover.successor_argv(argv) == ["--pidfile=", "-n", "--syslog", "ccproxy", "--config", "c.yaml"]
    assert handover.successor_argv(["--pidfile=/x", "ccproxy"]) == ["--pidfile=", "ccproxy"]


def test_successor_announces_readiness_once_through_the_claimed_descriptor() -> None:
    read, write = os.pipe()
    env = _env(CCPROXY_HANDOVER_FD=str(write))
    fd = handover.claim(env)
    assert fd == write and env == _env()
    assert handover.announce(fd)
    assert os.read(read, 100) == handover.READY
    os.close(read)
    assert handover.claim(_env()) is None
    assert not handover.announce(None)


class _Process:
    pid = 4242

    def __init__(self) -> None:
        self.signals: list[str] = []
        self.closed = False

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)

    def loseConnection(self) -> None:
        self.closed = True


class _Reactor(task.Clock):
    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[dict[str, Any]] = []

    def spawnProcess(self, proto: Any, executable: str, args: list[str], env: dict[str, str], path: str,
                     childFDs: dict[int, Any]) -> _Process:
        process = _Process()
        self.spawned.append({"proto": proto, "args": args, "env": env, "fds": childFDs, "process": process})
        return process


def _handover() -> tuple[_Reactor, list[str], handover.Handover]:
    reactor = _Reactor()
    retired: list[str] = []
    h = handover.Handover(reactor, lambda: 7, retired.append, argv=["-n", "ccproxy", "--config", "c.yaml"],
                          environ={"PATH": "/bin", "LISTEN_PID": "1"})
    return reactor, retired, h


def test_handover_passes_the_socket_as_systemd_does_and_retires_once_the_successor_is_ready() -> None:
    reactor, retired, h = _handover()
    h.start()
    spawned = reactor.spawned[0]
    assert spawned["fds"][3] == 7 and spawned["fds"][4] == "r"
    assert spawned["env"]["LISTEN_FDS"] == "1" and spawned["env"]["LISTEN_FDNAMES"] == "ccproxy"
    assert spawned["env"]["CCPROXY_HANDOVER_FD"] == "4"
    assert spawned["args"][:3] == ["/bin/sh", "-c", 'export LISTEN_PID=$$; exec "$@"']
    assert spawned["args"][-5:] == ["--pidfile=", "-n", "ccproxy", "--config", "c.yaml"]
    h.start()  # a second SIGUSR2 while one restart is under way starts nothing
    assert len(reactor.spawned) == 1
    spawned["proto"].childDataReceived(4, b"rea")
    assert retired == []
    spawned["proto"].childDataReceived(4, b"dy\n")
    assert retired == ["successor pid 4242 serves on the listening socket"]
    assert spawned["process"].closed
    reactor.advance(handover.READY_TIMEOUT * 2)
    assert spawned["process"].signals == []


def test_the_main_process_names_its_ready_successor_as_main_then_says_nothing_more(tmp_path: Path) -> None:
    manager = FakeManager(str(tmp_path / "notify.sock"), main=os.getpid())
    try:
        notifier = Notifier({"NOTIFY_SOCKET": manager.path})
        reactor, retired, h = _handover()
        h.notifier = notifier
        notifier.ready("listening")
        h.start()
        assert manager.receive(1.0) is not None and manager.receive(0.05) is None  # nothing sent on start
        reactor.spawned[0]["proto"].childDataReceived(4, handover.READY)
        named = manager.receive(1.0)
        assert named is not None and named.pid == os.getpid() and named.accepted
        assert named.fields["MAINPID"] == "4242" and "pid 4242 serves" in named.fields["STATUS"]
        assert manager.main == 4242 and retired  # named before the drain begins
        # Draining and exiting is no longer the service's state: nothing more is sent.
        notifier.stopping("stopping: draining")
        notifier.ready("listening")
        assert manager.receive(0.2) is None
    finally:
        manager.close()


def test_a_successor_that_exits_early_changes_nothing_and_a_new_attempt_may_follow() -> None:
    reactor, retired, h = _handover()
    h.start()
    reactor.spawned[0]["proto"].processEnded(Failure(Exception("exit code 1")))
    assert retired == [] and h.successor is None
    h.start()
    assert len(reactor.spawned) == 2


def test_a_successor_silent_too_long_is_killed_and_this_process_keeps_serving() -> None:
    reactor, retired, h = _handover()
    h.start()
    reactor.advance(handover.READY_TIMEOUT)
    assert reactor.spawned[0]["process"].signals == ["KILL"]
    assert retired == []


def _server(**server: Any) -> dict[str, Any]:
    return {"server": {"tls": {"enabled": False}, **server}, "admin": {"enabled": False}}


def test_workers_is_a_count_or_auto() -> None:
    assert parse(_server()).server.workers == 1
    assert parse(_server(workers=4)).server.workers == 4
    assert parse(_server(workers="auto")).server.workers == usable_cpus() == len(os.sched_getaffinity(0))
    for bad, message in [(0, "at least 1"), ("many", "an integer or 'auto'"), (True, "a boolean"),
                         (1000, "at most 256")]:
        with pytest.raises(ConfigError, match=message) as e:
            parse(_server(workers=bad))
        assert e.value.path == "server.workers"


def test_the_admin_socket_and_metrics_are_accepted_with_several_workers() -> None:
    # The supervisor serves both for the whole service (ccproxy.workers.admin).
    config = parse({"server": {"tls": {"enabled": False}, "workers": 2}, "admin": {"metrics": {"enabled": True}}})
    assert config.admin.socket is not None and config.admin.metrics.enabled and config.server.workers == 2


def test_workers_change_only_with_a_restart() -> None:
    changed = changed_paths(parse(_server()).effective(), parse(_server(workers=2)).effective())
    assert changed == ["server.workers"]
    with pytest.raises(ConfigError, match="restart"):
        _check_restart_only(changed)


def test_a_worker_accepts_one_connection_per_wake_up() -> None:
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory

    sock = activation.bind("127.0.0.1", 0)
    port: Any = activation.adopt(reactor, sock.detach(), Factory())
    try:
        assert port.numberAccepts == 100  # Twisted's own: a whole burst per wake-up
        activation.accept_one_at_a_time(port)
        port.numberAccepts += 20  # what Port.doRead does after a full loop
        assert port.numberAccepts == 1
    finally:
        port.stopListening()


# -- a worker's drain


class _StoppingClock(task.Clock):
    """The clock a retiring worker waits on, and the reactor it stops at the end."""

    running = True

    def stop(self) -> None:
        self.running = False


class _ListeningPort:
    def __init__(self) -> None:
        self.listening = True

    def stopListening(self) -> None:
        self.listening = False


def test_a_retiring_worker_drains_for_server_drain_timeout_then_cuts_and_stops() -> None:
    from twisted.web.server import NOT_DONE_YET

    from tests.support.hardening import Conn

    class Held:
        def render(self, request: Any) -> Any:
            request.request_id = "req_1"
            return NOT_DONE_YET

    c = Conn(resource=Held()).send(b"GET /v1/models HTTP/1.1\r\nHost: proxy\r\n\r\n")
    aborted: list[float] = []
    reactor = _StoppingClock()
    reactor.advance(c.clock.seconds())  # the drain reads the site's clock through the reactor
    c.transport.abortConnection = lambda: aborted.append(reactor.seconds())  # type: ignore[method-assign]
    service = SimpleNamespace(reactor=reactor, port=_ListeningPort(), site=c.site,
                              config=parse({**_server(drain_timeout="3s")}))
    start = reactor.seconds()
    retire(service, "test")
    assert not service.port.listening and c.site.draining
    reactor.advance(2.9)
    assert not aborted and reactor.running  # the request under way keeps its time
    reactor.advance(0.2)
    assert aborted and aborted[0] - start >= 3.0  # cut at server.drain_timeout, not a constant
    c.channel.connectionLost()
    reactor.advance(0.1)
    assert not reactor.running
