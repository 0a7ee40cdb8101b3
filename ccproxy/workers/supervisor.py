"""`server.workers` > 1: the twistd process becomes a supervisor of that many worker processes.

The supervisor binds the listening socket (or takes it from systemd or a predecessor) and never
accepts on it: each worker adopts the same socket (descriptor 3) and accepts from its one queue.
The kernel hands each connection to one waiting worker; a worker that dies loses only the
connections it had accepted, and the queue is served by the others meanwhile.

It restarts a worker that exits unasked, after a delay that doubles with each quick failure (0.5 s
up to 30 s; a worker that served for a minute resets it). SIGHUP: the supervisor reads and checks
the config file once, then sends the same text to every worker (an invalid file reaches none).
SIGTERM: every worker drains, then the supervisor exits. SIGUSR2: a new supervisor takes the
socket over (see `handover`) and this one drains its workers once the new workers are ready.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, protocol
from twisted.logger import Logger

from ccproxy.config import Config, ConfigError, loads
from ccproxy.notify import Notifier
from ccproxy.workers import activation, handover
from ccproxy.workers.admin import TO_SUPERVISOR, SupervisorAdmin
from ccproxy.workers.audit import AuditWriter
from ccproxy.workers.channel import Channel, adopt
from ccproxy.workers.drain import kill_after
from ccproxy.workers.gate import ConnectionCounts
from ccproxy.workers.state import StateOwner
from ccproxy.workers.worker import CONTROL, INDEX

log = Logger()

FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0
STABLE_AFTER = 60.0  # a worker that lived this long resets its slot's backoff
_CONTROL_FD = 4


class _Slot(protocol.ProcessProtocol):
    """One worker position: the process that fills it now, and how its predecessors fared."""

    def __init__(self, supervisor: Supervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.process: Any = None
        self.channel: Channel | None = None
        self.ready = False
        self.started_at = 0.0
        self.failures = 0
        self.restart: Any = None
        self.ended: defer.Deferred[None] | None = None
        self.last_pid: int | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def processEnded(self, reason: Any) -> None:
        self.supervisor.worker_ended(self, reason)


class Supervisor(Service):
    def __init__(self, config_path: str, config: Config, reactor: Any, argv: list[str] | None = None) -> None:
        self.config_path = config_path
        self.config = config
        self.reactor = reactor
        self.argv = handover.successor_argv(sys.argv[1:] if argv is None else argv)
        self.count = config.server.workers
        self.slots = [_Slot(self, i) for i in range(1, self.count + 1)]
        self.sock: socket.socket | None = None
        self.stopping = False
        self.announced = False
        self.announce_fd = handover.claim()
        self.handover: handover.Handover | None = None
        self.state = StateOwner(config.limits.state.max_entries, self.announce_block)
        self.connections = ConnectionCounts()
        self.audit = AuditWriter(config, reactor)
        # The supervisor is the service's main process: it alone speaks to systemd (workers are
        # started without NOTIFY_SOCKET).
        self.notifier = Notifier()
        self.admin = SupervisorAdmin(self)  # the admin socket and metrics, for every worker

    # -- start

    def startService(self) -> None:
        super().startService()
        self.audit.start(os.getppid() if self.announce_fd is not None else None)
        self.admin.start()
        self.sock, source = self._listener()
        host, port = self.sock.getsockname()[:2]
        log.info("supervisor (pid {pid}) listening on {host}:{port} ({source}); starting {count} workers",
                 pid=os.getpid(), host=host, port=port, source=source, count=self.count)
        for slot in self.slots:
            self.spawn(slot)
        signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.reload))
        self.handover = handover.Handover(self.reactor, self.sock.fileno, self.retire, notifier=self.notifier)
        self.handover.install()

    def _listener(self) -> tuple[socket.socket, str]:
        sockets = activation.inherited()
        if sockets:
            fd = activation.pick(sockets)
            for other in sockets:
                if other.fd != fd:
                    os.close(other.fd)
            activation.describe(fd)  # refuses a descriptor that is not a listening TCP socket
            sock = socket.socket(fileno=fd)
            sock.set_inheritable(True)
            return sock, f"descriptor {fd} passed by the parent process"
        server = self.config.server
        return activation.bind(server.host, server.port), "bound"

    def spawn(self, slot: _Slot) -> None:
        assert self.sock is not None
        slot.restart = None
        ours, theirs = socket.socketpair()
        env = {k: v for k, v in os.environ.items() if k not in (INDEX, CONTROL, handover.ENV_FD, "NOTIFY_SOCKET")}
        env[INDEX] = str(slot.index)
        env[CONTROL] = str(_CONTROL_FD)
        slot.ready = False
        slot.started_at = self.reactor.seconds()
        slot.ended = defer.Deferred()
        try:
            slot.process = handover.launch(self.reactor, slot, self.sock.fileno(), self.argv, env,
                                           {_CONTROL_FD: theirs.fileno()})
        finally:
            theirs.close()
        slot.channel = Channel(lambda message: self.message(slot, message), lambda: None)
        adopt(self.reactor, ours.detach(), slot.channel)
        self.admin.spawned(slot)
        slot.last_pid = slot.process.pid
        log.info("worker {index} started (pid {pid})", index=slot.index, pid=slot.pid)

    # -- what workers say

    def message(self, slot: _Slot, message: dict[str, Any]) -> None:
        op = message["op"]
        if op == "audit":
            self.audit.receive(message)
        elif op == "decide":
            self.state.charge_all(message.get("charges", ()))  # the turn's charges come before its questions
            if slot.channel is not None:
                slot.channel.send("decided", id=message.get("id"), answers=self.state.decide_all(message["items"]))
        elif op == "charge":
            self.state.charge_all(message["items"])
        elif op == "admit":
            if slot.channel is not None:
                answers = [self.connections.admit(slot.index, str(host), total, per_ip)
                           for host, total, per_ip in message["items"]]
                slot.channel.send("admitted", id=message.get("id"), answers=answers)
        elif op == "release":
            for host in message.get("hosts", []):
                self.connections.release(slot.index, str(host))
        elif op == "ready":
            slot.ready = True
            log.info("worker {index} (pid {pid}) ready; {ready} of {count} workers ready", index=slot.index,
                     pid=slot.pid, ready=self.ready_count(), count=self.count)
            self.broadcast_status()
            if not self.announced and self.ready_count() == self.count:
                self.announced = True
                handover.announce(self.announce_fd)
                self.announce_fd = None
                self.notifier.ready(f"{self.count} workers serving")
        elif op in TO_SUPERVISOR:
            self.admin.message(slot, message)
        elif op == "reloaded":
            if not message.get("ok"):
                log.error("worker {index} (pid {pid}) refused the reload", index=slot.index, pid=slot.pid)

    def announce_block(self, ip: str, until: float) -> None:
        for slot in self.slots:
            if slot.channel is not None:
                slot.channel.send("block", ip=ip, until=until)

    def ready_count(self) -> int:
        return sum(1 for slot in self.slots if slot.ready)

    def broadcast_status(self) -> None:
        for slot in self.slots:
            if slot.channel is not None:
                slot.channel.send("status", ready=self.ready_count(), configured=self.count)

    def worker_ended(self, slot: _Slot, reason: Any) -> None:
        slot.ready = False
        slot.channel = None
        pid, slot.process = slot.last_pid, None
        self.connections.worker_gone(slot.index)
        self.admin.ended(slot)
        ended, slot.ended = slot.ended, None
        if ended is not None:
            ended.callback(None)
        if self.stopping:
            log.info("worker {index} (pid {pid}) exited", index=slot.index, pid=pid)
            return
        lived = self.reactor.seconds() - slot.started_at
        slot.failures = 0 if lived >= STABLE_AFTER else slot.failures + 1
        delay = min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** max(0, slot.failures - 1))
        log.error("worker {index} (pid {pid}) died ({reason}); {ready} of {count} workers ready; "
                  "restarting it in {delay:g} s", index=slot.index, pid=pid, reason=_describe(reason),
                  ready=self.ready_count(), count=self.count, delay=delay)
        self.broadcast_status()
        slot.restart = self.reactor.callLater(delay, self.spawn, slot)

    # -- signals

    def reload(self) -> bool:
        """Check the config file once; send the same text to every worker, or to none."""
        self.notifier.reloading(f"reloading {self.config_path}")
        applied = self._reload()
        what = "config sent to the workers" if applied else "config reload refused, previous config serving"
        self.notifier.ready(f"{self.ready_count()} workers serving; {what}")
        return applied

    def _reload(self) -> bool:
        from ccproxy.service import _check_restart_only, changed_paths
        from ccproxy.tls import certificate_options

        try:
            with open(self.config_path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            log.error("config reload refused, still serving the previous config: cannot read {path}: {error}",
                      path=self.config_path, error=str(e))
            return False
        try:
            new = loads(text, self.config_path)
            changed = changed_paths(self.config.effective(), new.effective())
            _check_restart_only(changed)
            if new.server.tls.enabled:
                certificate_options(new.server.tls)
        except ConfigError as e:
            log.error("config reload refused by the supervisor; no worker reloads: {error}", error=str(e))
            return False
        self.config = new
        self.audit.configure(new)
        self.state.store.resize(new.limits.state.max_entries)
        live = [slot for slot in self.slots if slot.channel is not None]
        for slot in live:
            assert slot.channel is not None
            slot.channel.send("reload", text=text, path=self.config_path)
        log.info("config checked; sent to {count} workers", count=len(live))
        return True

    def retire(self, why: str) -> None:
        log.info("draining: {why}", why=why)
        d = self.drain_all()
        d.addBoth(lambda _: self.reactor.stop())

    def drain_all(self) -> defer.Deferred[Any]:
        """Tell every worker to drain; fires when all have exited (those still there after the
        drain timeout and a margin are killed)."""
        self.stopping = True
        waits = []
        for slot in self.slots:
            if slot.restart is not None and slot.restart.active():
                slot.restart.cancel()
            if slot.process is None or slot.ended is None:
                continue
            waits.append(slot.ended)
            if slot.channel is not None:
                slot.channel.send("drain")
            else:
                _signal(slot.process, "TERM")
        if not waits:
            return defer.succeed(None)
        done = defer.DeferredList(waits)
        kill = self.reactor.callLater(kill_after(self.config.server.drain_timeout), self._kill_all)
        done.addBoth(lambda result: (kill.cancel() if kill.active() else None, result)[1])
        return done

    def _kill_all(self) -> None:
        for slot in self.slots:
            if slot.process is not None:
                log.warn("worker {index} (pid {pid}) did not exit after draining; killing it",
                         index=slot.index, pid=slot.pid)
                _signal(slot.process, "KILL")

    def stopService(self) -> defer.Deferred[Any]:
        super().stopService()
        self.notifier.stopping(f"stopping: draining {self.count} workers")
        d = self.drain_all()

        def close(result: Any) -> Any:
            if self.sock is not None:
                self.sock.close()
                self.sock = None
            return defer.DeferredList([self.admin.stop(), defer.maybeDeferred(self.audit.stop)],
                                      consumeErrors=True)

        return d.addBoth(close)


def _signal(process: Any, name: str) -> None:
    try:
        process.signalProcess(name)
    except Exception:  # already exited: processEnded follows
        pass


def _describe(reason: Any) -> str:
    value = getattr(reason, "value", None)
    signal_number = getattr(value, "signal", None)
    if signal_number:
        return f"signal {signal_number}"
    return f"exit code {getattr(value, 'exitCode', '?')}"
