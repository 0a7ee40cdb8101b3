"""A worker: a ProxyService on the supervisor's listening socket, steered over the control channel.

The supervisor starts each worker as `twistd ... ccproxy` with the listening socket as descriptor 3
(announced with LISTEN_FDS, so `activation.listen` adopts it) and its end of the control channel as
descriptor `CCPROXY_CONTROL_FD`. A worker reloads only the config text the supervisor sends (so all
reload the same validated file, or none does), drains when told to or on SIGTERM, and drains and
exits if the supervisor goes away.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import MutableMapping
from typing import Any

from twisted.logger import Logger

from ccproxy.config import ConfigError, loads
from ccproxy.network.gate import Gate
from ccproxy.workers.activation import accept_one_at_a_time
from ccproxy.workers.audit import AuditForwarder
from ccproxy.workers.channel import Channel, adopt
from ccproxy.workers.drain import retire
from ccproxy.workers.state import SharedStore

log = Logger()

INDEX = "CCPROXY_WORKER"
CONTROL = "CCPROXY_CONTROL_FD"


def is_worker(environ: MutableMapping[str, str] | None = None) -> bool:
    return INDEX in (os.environ if environ is None else environ)


def gate_class() -> type[Gate]:
    """The accept gate: in a worker, one whose connection caps count every worker's connections."""
    from ccproxy.workers.gate import SharedGate

    return SharedGate if is_worker() else Gate


def audit_forwarder(holder: Any, deps: Any) -> AuditForwarder | None:
    """In a worker: audit events go to the supervisor, the trail's one writer."""
    return AuditForwarder(holder, deps.shared_store).start() if deps.shared_store is not None else None


def shared_store(reactor: Any, blocklist: Any) -> SharedStore | None:
    """In a worker: the store that stands for the supervisor's (connected once the worker runs)."""
    return SharedStore(reactor, blocklist) if is_worker() else None


class Worker:
    def __init__(self, service: Any, index: int) -> None:
        self.service = service
        self.index = index
        self.reactor = service.reactor
        self.channel = Channel(self.handle, self.lost)
        self.retiring = False
        self.store: SharedStore | None = service.deps.shared_store
        if self.store is not None:
            self.store.connect(self.channel.send)
        self.forwarder: AuditForwarder | None = getattr(service, "audit", None)
        # Imported here: it brings the metrics code, which a single process without metrics never loads.
        from ccproxy.workers.admin import TO_WORKER, WorkerAdmin

        self.admin_ops = TO_WORKER
        self.admin = WorkerAdmin(service, self.channel.send)  # follows the supervisor's incident state
        self.status(ready=0, configured=0)

    def handle(self, message: dict[str, Any]) -> None:
        op = message["op"]
        if op == "decided" and self.store is not None:
            self.store.asker.answered(message)
        elif op == "admitted" and self.store is not None:
            self.store.admissions.answered(message)
        elif op == "block" and self.store is not None:
            self.store.blocked(str(message["ip"]), float(message["until"]))
        elif op == "reload":
            self.reload(str(message.get("text", "")), str(message.get("path", "")))
        elif op == "drain":
            self.drain("the supervisor asked")
        elif op == "status":
            self.status(int(message.get("ready", 0)), int(message.get("configured", 0)))
        elif op in self.admin_ops:
            self.admin.handle(message)

    def reload(self, text: str, path: str) -> None:
        try:
            config = loads(text, path)
        except ConfigError as e:
            log.error("config reload refused, still serving the previous config: {error}", error=str(e))
            self.channel.send("reloaded", ok=False)
            return
        self.channel.send("reloaded", ok=bool(self.service.reload(config)))

    def status(self, ready: int, configured: int) -> None:
        body = {"status": "ready", "worker": self.index, "pid": os.getpid(),
                "workers": {"ready": ready, "configured": configured}}
        self.service.holder.ready_body = json.dumps(body, separators=(",", ":")).encode()

    def drain(self, why: str) -> None:
        if self.retiring:
            return
        self.retiring = True
        # /ready keeps saying ready: on a restart the socket's new owner is ready, and a connection
        # this worker already took is still served in full.
        retire(self.service, f"worker {self.index}: {why}")

    def lost(self) -> None:
        if self.store is not None:
            self.store.lost()
        if not self.retiring:
            log.error("worker {index}: the supervisor is gone; draining and exiting", index=self.index)
        self.drain("the supervisor is gone")


def attach(service: Any, environ: MutableMapping[str, str] | None = None) -> Worker:
    """Make the started ProxyService `service` a worker of the supervisor that started this process."""
    env = os.environ if environ is None else environ
    index = int(env.pop(INDEX))
    fd = int(env.pop(CONTROL))
    worker = Worker(service, index)
    reactor = service.reactor
    # Reloads and restarts are the supervisor's: a signal sent to every process of the service
    # (systemd's default KillMode) must not make one worker differ from the others.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    # SIGTERM drains (the reactor installs its own handler when it starts running: replace it then).
    reactor.callWhenRunning(signal.signal, signal.SIGTERM,
                            lambda *_: reactor.callFromThread(worker.drain, "SIGTERM"))
    adopt(reactor, fd, worker.channel)
    # The listening socket is shared with the other workers: take connections one per wake-up, so a
    # burst is spread over every waiting worker (bench/balance.py).
    accept_one_at_a_time(service.port)
    if isinstance(worker.forwarder, AuditForwarder):
        worker.forwarder.flush()  # what was recorded while starting
    worker.channel.send("ready", pid=os.getpid())
    log.info("worker {index} (pid {pid}) serving", index=index, pid=os.getpid())
    return worker
