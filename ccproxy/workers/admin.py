"""The operator's side with `server.workers` > 1: the supervisor serves the admin socket and the
metrics listener for the whole service; workers follow it.

The supervisor keeps the incident state (operator and rule blocks, emergency mode, in
`incident.json` as one process keeps it) and sends all of it to every worker after each change
and to each worker it starts, so a replaced worker refuses the same addresses from its first
connection. A worker mirrors it (`IncidentState.mirror`): a new block reaches its listener, which
closes that address's open connections, and switching emergency mode on closes them all as in one
process. Blocks a worker's alert rule makes go to the supervisor, which records and spreads them.

Commands that read (`status`, `list-blocks`) ask every worker over the control channel and
answer for the service; `/metrics` does the same with the workers' figures (see `figures`).
Publishing a block or the emergency switch to other instances sharing Redis is done by one worker,
which holds the Redis connection; the workers watch for a switch made elsewhere and tell the
supervisor, which takes it as one process does.

Messages, supervisor to worker: `incident` (the state, and the automatic blocks in force),
`unblock`, `share-block`, `share-emergency`, `rekey` (re-read the rotated keys), `collect`.
Worker to supervisor: `figures` (the answer to `collect`, and every `PUSH_EVERY` seconds),
`rule-block`, `emergency-seen` (a later switch published by another instance sharing Redis).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.web.server import NOT_DONE_YET

from ccproxy import events
from ccproxy.admin.server import Admin, CommandError, _text, listen
from ccproxy.admin.state import TICK, IncidentState, parse_target, target_text
from ccproxy.blocklist import BlockList
from ccproxy.limits import limiter_of, share_block
from ccproxy.metrics import Metrics, MetricsResource
from ccproxy.workers.figures import ASK_TIMEOUT, PUSH_EVERY, Merged, exposition, of_registry

if TYPE_CHECKING:
    from ccproxy.workers.supervisor import Supervisor, _Slot

log = Logger()

TO_WORKER = frozenset({"incident", "unblock", "share-block", "share-emergency", "rekey", "collect"})
TO_SUPERVISOR = frozenset({"figures", "rule-block", "emergency-seen"})


# -- in a worker


class WorkerAdmin:
    """Follows the supervisor's incident state; answers for this worker's figures and state."""

    def __init__(self, service: Any, send: Callable[..., None]) -> None:
        self.service = service
        self.send = send
        self.pid = os.getpid()
        self.holder = service.holder
        self.deps = service.deps
        self.incident: IncidentState = service.deps.incident
        self.incident.forward_rule_block = lambda target, duration, rule: send(
            "rule-block", target=target, duration=duration, rule=rule)
        # A switch made on another instance sharing Redis: read here (the worker has the Redis
        # connection), taken by the supervisor, which tells every worker.
        self.watch = task.LoopingCall(self.watch_shared)
        self.watch.clock = service.reactor
        self.watch.start(TICK, now=False).addErrback(lambda f: log.failure("emergency watch stopped", f))
        self.push: task.LoopingCall | None = None
        if self.metrics is not None:
            self.push = task.LoopingCall(self.send_figures, 0)
            self.push.clock = service.reactor
            self.push.start(PUSH_EVERY, now=False).addErrback(lambda f: log.failure("metrics push stopped", f))

    @property
    def metrics(self) -> Metrics | None:
        return getattr(self.service.admin, "metrics", None)

    def handle(self, message: dict[str, Any]) -> None:
        op = message["op"]
        if op == "incident":
            self.incident.mirror(message.get("state") or {})
            for ip, until in message.get("auto") or []:
                self.deps.blocklist.block(str(ip), float(until))
        elif op == "unblock":
            target = str(message["target"])
            limiter = limiter_of(self.holder.current)
            if limiter is not None:
                limiter.lift(target)
            else:
                self.deps.blocklist.unblock_network(parse_target(target))
            if message.get("share"):
                share_block(self.holder, target, None)
        elif op == "share-block":  # `until` None: until unblocked (a lifting is `unblock`)
            until = message.get("until")
            share_block(self.holder, str(message["target"]), math.inf if until is None else float(until))
        elif op == "share-emergency":
            if self.incident.remote is not None:
                self.incident.remote.publish(message.get("state"))
        elif op == "rekey":
            self.rekey()
        elif op == "collect":
            self.send_figures(int(message.get("id", 0)), bool(message.get("blocks")))

    def watch_shared(self) -> Any:
        remote = self.incident.remote
        if remote is None:
            return None

        async def look() -> None:
            shared = await remote.fetch()
            if isinstance(shared, dict) and _later(shared, self.incident.emergency_changed):
                self.send("emergency-seen", state=shared)

        d = defer.ensureDeferred(look())
        d.addErrback(lambda f: log.warn("could not read the shared emergency switch: {error}",
                                        error=f.getErrorMessage()))
        return d

    def send_figures(self, ask: int, blocks: bool = False) -> None:
        metrics = self.metrics
        runtime = self.holder.current
        limiter = limiter_of(runtime)
        status = {
            "connections": getattr(self.service.gate, "total", 0),
            "backend_up": limiter is None or not limiter.down_reported,
            "ready": bool(self.holder.ready),
        }
        fields: dict[str, Any] = {"id": ask, "pid": self.pid, "status": status}
        if metrics is not None:
            fields["families"] = of_registry(metrics.registry)
        if blocks:
            now = self.service.reactor.seconds()
            fields["blocks"] = [] if limiter is None else [
                [ip, until] for ip, until in limiter.blocks.items() if until > now]
        self.send("figures", **fields)

    def rekey(self) -> None:
        """A key was rotated through the supervisor: take the rotated-keys file as it did."""
        from ccproxy.config import ConfigError
        from ccproxy.config.overlay import with_overlay
        from ccproxy.runtime import build

        runtime = self.holder.current
        try:
            config = with_overlay(runtime.config)
        except ConfigError as e:
            log.error("could not take the rotated key: {error}", error=str(e))
            return
        self.holder.current = build(config, self.deps, runtime.forwarder, runtime)

    def stop(self) -> None:
        for loop in (self.push, self.watch):
            if loop is not None and loop.running:
                loop.stop()


def _later(shared: dict[str, Any], changed: float) -> bool:
    try:
        return float(shared["changed"]) > changed
    except (KeyError, TypeError, ValueError):
        return False


# -- in the supervisor


class _KeptIncident(IncidentState):
    """The supervisor's incident state: every change written is sent to every worker."""

    def __init__(self, owner: SupervisorAdmin, state_dir: str, blocklist: BlockList, clock: Any) -> None:
        super().__init__(state_dir, blocklist, clock)
        self.owner = owner

    def save(self) -> None:
        super().save()
        self.owner.spread()


class _ViaWorker:
    """`IncidentState.remote` for the supervisor: one worker publishes the switch through Redis."""

    def __init__(self, owner: SupervisorAdmin) -> None:
        self.owner = owner

    def publish(self, value: Any) -> None:
        self.owner.to_one("share-emergency", state=value)

    async def fetch(self) -> Any:
        return None


class _Holder:
    """What `Admin` reads of a running service, for the supervisor (no layers of its own)."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    @property
    def current(self) -> Any:
        return SimpleNamespace(config=self.supervisor.config, layers=())

    @property
    def ready(self) -> bool:
        return self.supervisor.ready_count() == self.supervisor.count


class ServiceCommands(Admin):
    """The admin commands over the supervisor's state, answered for every worker."""

    def __init__(self, owner: SupervisorAdmin) -> None:
        supervisor = owner.supervisor
        super().__init__(_Holder(supervisor), SimpleNamespace(blocklist=owner.blocklist), owner.incident,
                         supervisor.reactor, supervisor.config_path, rebuild=owner.rekey)
        self.owner = owner

    async def status(self, args: dict[str, Any], by: str) -> dict[str, Any]:
        supervisor = self.owner.supervisor
        config = supervisor.config
        answers = await self.owner.ask()
        return {
            **self.about(config),
            "workers": {"ready": supervisor.ready_count(), "configured": supervisor.count,
                        "answered": len(answers)},
            "connections": sum(int(a["status"].get("connections") or 0) for a in answers),
            "blocked": self.owner.blocked_count(),
            "operator_blocks": len(self.incident.blocks),
            "emergency": self.incident.emergency,
            "emergency_since": self.incident.emergency_since,
            "state_backend": config.limits.state.backend if config.limits.active else "none",
            "state_backend_up": all(bool(a["status"].get("backend_up", True)) for a in answers),
        }

    async def block_ip(self, args: dict[str, Any], by: str) -> dict[str, Any]:
        result = await super().block_ip(args, by)  # written, then sent to every worker
        self.owner.to_one("share-block", target=result["target"], until=result["until"])
        return result

    async def unblock_ip(self, args: dict[str, Any], by: str) -> dict[str, Any]:
        target = target_text(parse_target(_text(args, "target")))
        automatic = target in await self.owner.automatic_blocks()
        if not self.incident.unblock(target, by):
            if not automatic:
                raise CommandError(f"{target} is not blocked")
            events.emit("ip_unblocked", "notice", ip_address=target, reason="unblocked by command", by=by)
        self.owner.supervisor.state.blocks.pop(target, None)
        self.owner.to_all("unblock", target=target, first={"share": True})
        return {"target": target}

    async def list_blocks(self, args: dict[str, Any], by: str) -> dict[str, Any]:
        now = self.reactor.seconds()
        operator = [b.as_dict() for b in self.incident.list()]
        auto = [{"target": ip, "until": until, "reason": "auto_block", "by": "auto_block"}
                for ip, until in sorted((await self.owner.automatic_blocks()).items())
                if ip not in self.incident.blocks]
        return {"blocks": operator + auto, "now": now}


class SupervisorAdmin:
    """The admin socket, the incident state and the metrics of a supervisor and its workers."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.reactor = supervisor.reactor
        config = supervisor.config
        self.blocklist = BlockList()
        self.incident = _KeptIncident(self, config.admin.state_dir, self.blocklist, self.reactor)
        self.incident.remote = _ViaWorker(self)
        self.commands = ServiceCommands(self)
        self.merged = Merged()
        self.reporting: dict[int, int] = {}  # slot -> the pid its worker reports figures as
        # The supervisor's own counters (audit records lost, alerts ...) and its process figures.
        self.metrics = Metrics(clock=self.reactor.seconds)
        self.restarts = Counter("ccproxy_worker_restarts", "Workers that exited unasked and were started again",
                                registry=self.metrics.registry)
        self.ports: list[Any] = []
        self._asks: dict[int, _Ask] = {}
        self._next = 0
        self.started = False

    def start(self) -> None:
        config = self.supervisor.config
        self.incident.load()
        self.incident.start()
        self.started = True
        if config.admin.socket is not None:
            try:
                self.ports.append(listen(self.reactor, config.admin.socket, self.commands))
            except OSError as e:
                log.warn("admin socket {path} unavailable: {error}; `ccproxy security` commands will not "
                         "reach this daemon", path=config.admin.socket, error=str(e))
            else:
                log.info("admin socket listening on {path} for {count} workers", path=config.admin.socket,
                         count=self.supervisor.count)
        if config.admin.metrics.enabled:
            from ccproxy.admin.service import listen_metrics

            events.add_observer(self.metrics.observe)
            self.ports.append(listen_metrics(self.reactor, config.admin.metrics, ServiceMetrics(self)))
        if self.incident.emergency:
            log.warn("emergency mode is on (since {since}); `ccproxy security emergency --disable` ends it",
                     since=self.incident.emergency_since)

    def stop(self) -> defer.Deferred[Any]:
        self.incident.stop()
        events.remove_observer(self.metrics.observe)
        for ask in list(self._asks.values()):
            ask.finish()
        return defer.DeferredList([defer.maybeDeferred(p.stopListening) for p in self.ports], consumeErrors=True)

    # -- to the workers

    def live(self) -> list[_Slot]:
        return [slot for slot in self.supervisor.slots if slot.channel is not None]

    def to_all(self, op: str, first: dict[str, Any] | None = None, **fields: Any) -> None:
        """`op` to every worker; `first`: fields added for one of them only."""
        for i, slot in enumerate(self.live()):
            assert slot.channel is not None
            slot.channel.send(op, **fields, **((first or {}) if i == 0 else {}))

    def to_one(self, op: str, **fields: Any) -> None:
        live = self.live()
        if live:
            assert live[0].channel is not None
            live[0].channel.send(op, **fields)

    def spread(self) -> None:
        """The incident state, to every worker (after each change)."""
        self.to_all("incident", state=self.incident.snapshot())

    def spawned(self, slot: _Slot) -> None:
        """A worker was started: the state it must enforce from its first connection."""
        if slot.channel is not None:
            now = self.reactor.seconds()
            auto = [[ip, until] for ip, until in self.supervisor.state.blocks.items() if until > now]
            slot.channel.send("incident", state=self.incident.snapshot(), auto=auto)

    def rekey(self, config: Any) -> None:
        self.supervisor.config = config
        self.to_all("rekey")

    # -- from the workers

    def message(self, slot: _Slot, message: dict[str, Any]) -> None:
        op = message["op"]
        if op == "figures":
            pid = message.get("pid")
            if isinstance(pid, int) and "families" in message:
                if pid not in self.merged.gone:  # not a late message from a process that has ended
                    self.reporting[slot.index] = pid
                self.merged.update(pid, message["families"])
            ask = self._asks.get(int(message.get("id") or 0))
            if ask is not None:
                ask.answered(slot.index, message)
        elif op == "rule-block":
            try:
                self.incident.block_by_rule(str(message["target"]), float(message["duration"]),
                                            str(message["rule"]))
            except (KeyError, TypeError, ValueError):
                return
            self.spread()
        elif op == "emergency-seen" and isinstance(message.get("state"), dict):
            self.incident.take_shared(message["state"])
            self.spread()

    def ended(self, slot: _Slot) -> None:
        for pid in {self.reporting.pop(slot.index, None), slot.last_pid}:
            self.merged.ended(pid)
        if not self.supervisor.stopping:
            self.restarts.inc()
        for ask in list(self._asks.values()):
            ask.answered(slot.index, None)

    # -- asking every worker

    def ask(self, blocks: bool = False) -> defer.Deferred[list[dict[str, Any]]]:
        """The workers' answers to `collect` (those that answer within ASK_TIMEOUT)."""
        self._next += 1
        number = self._next
        live = self.live()
        ask = _Ask(self, number, {slot.index for slot in live})
        self._asks[number] = ask
        for slot in live:
            assert slot.channel is not None
            slot.channel.send("collect", id=number, blocks=blocks)
        ask.timeout = self.reactor.callLater(ASK_TIMEOUT, ask.finish)
        if not live:
            ask.finish()
        return ask.done

    async def automatic_blocks(self) -> dict[str, float]:
        """Blocks made by auto-blocking, in force: the supervisor's store, and each worker's
        (with the Redis backend, learned there)."""
        now = self.reactor.seconds()
        out = {ip: until for ip, until in self.supervisor.state.blocks.items() if until > now}
        for answer in await self.ask(blocks=True):
            for ip, until in answer.get("blocks") or []:
                if float(until) > now:
                    out[str(ip)] = max(float(until), out.get(str(ip), 0.0))
        return out

    def blocked_count(self) -> int:
        now = self.reactor.seconds()
        auto = {ip for ip, until in self.supervisor.state.blocks.items() if until > now}
        return len(self.blocklist) + len(auto - set(self.incident.blocks))

    # -- metrics

    def own_figures(self) -> list[list[Any]]:
        supervisor = self.supervisor

        def gauge(name: str, doc: str, value: float) -> list[Any]:
            return [name, "gauge", doc, [[name, {}, float(value)]]]

        return [
            *of_registry(self.metrics.registry, process=True),
            gauge("ccproxy_blocked_ips", "Addresses and ranges blocked at accept", self.blocked_count()),
            gauge("ccproxy_emergency_mode", "1 while emergency mode is on", 1 if self.incident.emergency else 0),
            gauge("ccproxy_audit_queue_depth", "Audit records waiting to be written or sent",
                  _audit_depth(supervisor.audit.trail)),
            gauge("ccproxy_workers_up", "Workers serving", supervisor.ready_count()),
            gauge("ccproxy_workers_configured", "Workers configured (server.workers)", supervisor.count),
        ]

    def exposition(self) -> bytes:
        return exposition(self.merged.metrics(self.own_figures()))


def _audit_depth(trail: Any) -> int:
    sinks = getattr(trail, "sinks", None) or {}
    return sum(len(getattr(s, "queue", ())) + len(getattr(s, "buffer", ())) for s in list(sinks.values()))


class _Ask:
    """One question to every live worker; `done` fires with the answers when all have answered,
    or at the timeout with those that did."""

    def __init__(self, owner: SupervisorAdmin, number: int, waiting: set[int]) -> None:
        self.owner = owner
        self.number = number
        self.waiting = waiting
        self.answers: list[dict[str, Any]] = []
        self.done: defer.Deferred[list[dict[str, Any]]] = defer.Deferred()
        self.timeout: Any = None

    def answered(self, index: int, message: dict[str, Any] | None) -> None:
        if index not in self.waiting:
            return
        self.waiting.discard(index)
        if message is not None and isinstance(message.get("status"), dict):
            self.answers.append(message)
        if not self.waiting:
            self.finish()

    def finish(self) -> None:
        if self.done.called:
            return
        self.owner._asks.pop(self.number, None)
        if self.timeout is not None and self.timeout.active():
            self.timeout.cancel()
        self.done.callback(self.answers)


class ServiceMetrics(MetricsResource):
    """`GET /metrics` for the whole service: asks every worker, then answers with the sums."""

    def __init__(self, owner: SupervisorAdmin) -> None:
        super().__init__(owner.metrics)
        self.owner = owner

    def render_metrics(self, request: Any) -> Any:
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def answer(_: Any) -> None:
            if gone:
                return
            request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
            request.write(self.owner.exposition())
            request.finish()

        def failed(failure: Any) -> None:
            log.failure("metrics scrape failed", failure)
            if not gone:
                request.setResponseCode(500)
                request.finish()

        self.owner.ask().addCallback(answer).addErrback(failed)
        return NOT_DONE_YET


__all__ = ["TO_SUPERVISOR", "TO_WORKER", "SupervisorAdmin", "WorkerAdmin"]
