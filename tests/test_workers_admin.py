"""The supervisor's admin side in memory: commands fanned out to workers over a fake channel, and
the workers' metrics merged. Real supervisor, real worker-side followers, a task.Clock."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, task

from ccproxy.admin.state import IncidentState
from ccproxy.blocklist import BlockList
from ccproxy.config import parse
from ccproxy.forward import Forwarder
from ccproxy.metrics import Metrics, Sources
from ccproxy.runtime import Deps, RuntimeHolder, build
from ccproxy.workers.admin import TO_SUPERVISOR, TO_WORKER, WorkerAdmin
from ccproxy.workers.figures import Merged, exposition, of_registry
from ccproxy.workers.supervisor import Supervisor

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class _Wire:
    """One end of a control channel: JSON both ways, as the socket carries it."""

    def __init__(self, deliver: Any) -> None:
        self.deliver = deliver
        self.sent: list[dict[str, Any]] = []

    def send(self, op: str, **fields: Any) -> None:
        message = json.loads(json.dumps({"op": op, **fields}))
        self.sent.append(message)
        self.deliver(message)


class _Worker:
    """What a worker process holds that the admin side touches: its runtime, blocklist, incident
    state, metrics and open connections; followed by a real WorkerAdmin."""

    def __init__(self, supervisor: Supervisor, index: int, pid: int, tmp: Path, metrics: bool) -> None:
        clock = supervisor.reactor
        config = supervisor.config
        self.blocklist = BlockList()
        self.closed: list[Any] = []
        self.blocklist.listeners.append(self.closed.append)  # the gate closes these connections
        incident = IncidentState(config.admin.state_dir, self.blocklist, clock)
        incident.keeper = False
        self.emergencies: list[bool] = []
        incident.on_emergency.append(lambda: self.emergencies.append(True))
        deps = Deps(reactor=clock, blocklist=self.blocklist, incident=incident)
        holder = RuntimeHolder(build(config, deps, Forwarder(clock)))
        holder.ready = True
        gate = SimpleNamespace(total=3)
        self.metrics = Metrics(Sources(holder, deps, gate)) if metrics else None
        self.service = SimpleNamespace(holder=holder, deps=deps, reactor=clock, gate=gate,
                                       admin=SimpleNamespace(metrics=self.metrics))
        self.slot = supervisor.slots[index - 1]
        self.pid = pid
        self.to_supervisor = _Wire(lambda m: supervisor.message(self.slot, m))
        self.admin = WorkerAdmin(self.service, self.to_supervisor.send)
        self.admin.pid = pid
        self.slot.channel = _Wire(self.receive)  # type: ignore[assignment]
        self.slot.last_pid = pid
        self.slot.ready = True

    def receive(self, message: dict[str, Any]) -> None:
        if message["op"] == "block":  # an automatic block (ccproxy.workers.state.SharedStore.blocked)
            self.blocklist.block(message["ip"], message["until"])
            return
        if message["op"] == "status":  # how many workers are ready (for /ready)
            return
        assert message["op"] in TO_WORKER
        self.admin.handle(message)

    @property
    def incident(self) -> IncidentState:
        incident = self.service.deps.incident
        assert isinstance(incident, IncidentState)
        return incident


def _service(tmp_path: Path, metrics: bool = False, **config: Any) -> tuple[Supervisor, list[_Worker], task.Clock]:
    clock = task.Clock()
    clock.advance(1_000_000)
    parsed = parse({"server": {"tls": {"enabled": False}, "workers": 2},
                    "admin": {"state_dir": str(tmp_path), "socket": str(tmp_path / "admin.sock")}, **config})
    supervisor = Supervisor(str(tmp_path / "config.yaml"), parsed, clock, argv=["ccproxy"])
    workers = [_Worker(supervisor, i, 100 + i, tmp_path, metrics) for i in (1, 2)]
    supervisor.admin.incident.start()  # expiry (the admin socket itself is tested end to end)
    return supervisor, workers, clock


def run(supervisor: Supervisor, command: str, **args: Any) -> dict[str, Any]:
    d = defer.ensureDeferred(supervisor.admin.commands.run({"command": command, "args": args}, "uid=0 pid=1"))
    result: list[dict[str, Any]] = []
    d.addCallback(result.append)
    assert result, "the command did not answer at once: every worker answers in the same turn here"
    return result[0]


def test_a_block_reaches_every_worker_and_is_kept_and_reported_once(
        tmp_path: Path, seen_events: list[dict[str, Any]]) -> None:
    supervisor, workers, clock = _service(tmp_path)
    answer = run(supervisor, "block-ip", target="203.0.113.7", duration="1h", reason="key guessing")
    assert answer["ok"], answer
    now = clock.seconds()
    for w in workers:
        assert w.blocklist.is_blocked("203.0.113.7", now)
        assert w.closed == ["203.0.113.7"]  # its listener closes the address's open connections
        assert list(w.incident.blocks) == ["203.0.113.7"]
    # Written where one process writes it, and reported once (by the supervisor).
    kept = json.loads((tmp_path / "incident.json").read_text())
    assert [b["target"] for b in kept["blocks"]] == ["203.0.113.7"]
    assert [e["ccproxy_event"] for e in seen_events if e["ccproxy_event"] == "ip_blocked"] == ["ip_blocked"]
    # A range too.
    assert run(supervisor, "block-ip", target="10.9.0.0/16")["ok"]
    assert all(w.blocklist.is_blocked("10.9.4.4", now) for w in workers)
    listed = run(supervisor, "list-blocks")["result"]["blocks"]
    assert [b["target"] for b in listed] == ["203.0.113.7", "10.9.0.0/16"]

    assert run(supervisor, "unblock-ip", target="203.0.113.7")["ok"]
    assert not any(w.blocklist.is_blocked("203.0.113.7", now) for w in workers)
    assert run(supervisor, "unblock-ip", target="203.0.113.7") == {"ok": False, "error": "203.0.113.7 is not blocked"}
    # The workers write nothing: the file is the supervisor's.
    assert [b["target"] for b in json.loads((tmp_path / "incident.json").read_text())["blocks"]] == ["10.9.0.0/16"]


def test_a_worker_started_later_gets_the_blocks_and_the_emergency_switch(tmp_path: Path) -> None:
    supervisor, workers, clock = _service(tmp_path)
    assert run(supervisor, "block-ip", target="203.0.113.7")["ok"]
    supervisor.state.blocks["198.51.100.1"] = clock.seconds() + 60  # an automatic block, in force
    assert run(supervisor, "emergency", action="enable")["result"]["emergency"] is True
    assert [w.emergencies for w in workers] == [[True], [True]]  # each closes its connections
    assert all(w.incident.emergency for w in workers)

    replaced = _Worker(supervisor, 1, 201, tmp_path, metrics=False)
    assert not replaced.incident.emergency
    supervisor.admin.spawned(replaced.slot)
    now = clock.seconds()
    assert replaced.incident.emergency and replaced.emergencies == [True]
    assert replaced.blocklist.is_blocked("203.0.113.7", now)
    assert replaced.blocklist.is_blocked("198.51.100.1", now)
    assert math.isinf(replaced.incident.blocks["203.0.113.7"].until or math.inf)

    assert run(supervisor, "emergency", action="disable")["result"]["emergency"] is False
    assert not replaced.incident.emergency and not workers[1].incident.emergency


def test_an_automatic_block_is_lifted_everywhere_and_status_answers_for_the_service(tmp_path: Path) -> None:
    supervisor, workers, clock = _service(tmp_path)
    until = clock.seconds() + 60
    supervisor.announce_block("198.51.100.1", until)
    supervisor.state.blocks["198.51.100.1"] = until
    assert all(w.blocklist.is_blocked("198.51.100.1", clock.seconds()) for w in workers)
    status = run(supervisor, "status")["result"]
    assert status["workers"] == {"ready": 2, "configured": 2, "answered": 2}
    assert status["connections"] == 6  # 3 open on each worker
    assert status["blocked"] == 1 and status["operator_blocks"] == 0 and status["ready"] is True
    listed = run(supervisor, "list-blocks")["result"]["blocks"]
    assert [(b["target"], b["by"]) for b in listed] == [("198.51.100.1", "auto_block")]
    assert run(supervisor, "unblock-ip", target="198.51.100.1")["ok"]
    assert "198.51.100.1" not in supervisor.state.blocks
    assert not any(w.blocklist.is_blocked("198.51.100.1", clock.seconds()) for w in workers)
    # Only one worker publishes the lifting to other instances (through Redis, when shared).
    unblocks = [m for w in workers for m in w.slot.channel.sent if m["op"] == "unblock"]  # type: ignore[union-attr]
    assert [m.get("share", False) for m in unblocks] == [True, False]


def test_a_worker_that_does_not_answer_is_waited_for_no_longer_than_the_timeout(tmp_path: Path) -> None:
    supervisor, workers, clock = _service(tmp_path)
    workers[1].slot.channel = _Wire(lambda m: None)  # type: ignore[assignment]
    d = defer.ensureDeferred(supervisor.admin.commands.run({"command": "status", "args": {}}, "uid=0"))
    got: list[Any] = []
    d.addCallback(got.append)
    assert got == []
    clock.advance(2.0)
    assert got[0]["result"]["workers"]["answered"] == 1 and got[0]["result"]["connections"] == 3
    # A worker that dies while asked is not waited for.
    d = defer.ensureDeferred(supervisor.admin.commands.run({"command": "status", "args": {}}, "uid=0"))
    d.addCallback(got.append)
    assert len(got) == 1
    supervisor.admin.ended(workers[1].slot)
    assert len(got) == 2 and got[1]["result"]["workers"]["answered"] == 1


def test_a_rule_block_made_in_one_worker_reaches_the_others_and_the_file(
        tmp_path: Path, seen_events: list[dict[str, Any]]) -> None:
    supervisor, workers, clock = _service(tmp_path)
    workers[0].incident.block_by_rule("203.0.113.9", 300, "key_guessing")
    now = clock.seconds()
    assert all(w.blocklist.is_blocked("203.0.113.9", now) for w in workers)
    assert "203.0.113.9" in supervisor.admin.incident.blocks
    clock.advance(1.0)  # rule blocks are written within a second
    assert [b["by"] for b in json.loads((tmp_path / "incident.json").read_text())["blocks"]] == ["rule key_guessing"]
    assert len([e for e in seen_events if e["ccproxy_event"] == "ip_blocked"]) == 1
    # Expired: the supervisor reports it and the workers follow.
    clock.advance(300)
    assert "203.0.113.9" not in workers[1].incident.blocks


def test_a_rotated_key_reaches_every_worker(tmp_path: Path) -> None:
    import hashlib

    auth = {"enabled": True, "api_keys": [{"id": "app", "key_sha256": hashlib.sha256(b"k" * 40).hexdigest()}]}
    supervisor, workers, _ = _service(tmp_path, security={"auth": auth})
    answer = run(supervisor, "rotate-key", key_id="app", grace="1h")
    assert answer["ok"], answer
    digest = hashlib.sha256(answer["result"]["key"].encode()).hexdigest()
    for config in [supervisor.config, *(w.service.holder.current.config for w in workers)]:
        assert digest in [k.sha256.reveal() for k in config.auth.keys]


# -- metrics


class _Route:
    api, kind = "anthropic", "messages"


class _Request:
    def __init__(self, code: int) -> None:
        self.status, self.path, self.target, self.started = code, b"/v1/messages", b"/v1/messages", 10.0
        self.ctx = SimpleNamespace(route=_Route())


def _count(m: Metrics, n: int, seconds: float = 0.2) -> None:
    for _ in range(n):
        m.request_done(_Request(200), 10.0 + seconds)


def _parse(text: bytes) -> Samples:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _served(samples: Samples) -> float:
    return samples.get(("ccproxy_requests_total", (("api", "anthropic"), ("route", "messages"), ("status", "200"))), 0)


def test_counters_and_histograms_are_summed_over_workers() -> None:
    a, b = Metrics(), Metrics()
    _count(a, 3, 0.2)
    _count(b, 7, 3.0)
    a.observe({"ccproxy_event": "authentication_failure", "reason": "invalid_api_key"})
    merged = Merged()
    merged.update(1, of_registry(a.registry))
    merged.update(2, of_registry(b.registry))
    out = _samples(merged)
    assert _served(out) == 10
    duration = "ccproxy_request_duration_seconds"
    assert out[(f"{duration}_count", (("api", "anthropic"),))] == 10
    assert out[(f"{duration}_bucket", (("api", "anthropic"), ("le", "0.25")))] == 3
    assert out[(f"{duration}_bucket", (("api", "anthropic"), ("le", "+Inf")))] == 10
    assert out[(f"{duration}_sum", (("api", "anthropic"),))] == pytest.approx(3 * 0.2 + 7 * 3.0)
    assert out[("ccproxy_auth_failures_total", (("reason", "invalid_api_key"),))] == 1
    assert not any(name.startswith("process_") for name, _ in out)  # the workers' own are left out


def _samples(merged: Merged, own: list[list[Any]] | None = None) -> Samples:
    return _parse(exposition(merged.metrics(own)))


def test_a_worker_that_ends_keeps_its_counts_and_a_late_report_adds_only_what_is_new() -> None:
    a, b = Metrics(), Metrics()
    merged = Merged()
    _count(a, 4)
    _count(b, 6)
    merged.update(1, of_registry(a.registry))
    merged.update(2, of_registry(b.registry))
    assert _served(_samples(merged)) == 10
    _count(a, 2)  # counted, reported after the process ended (read late from the socket)
    late = of_registry(a.registry)
    merged.ended(1)
    assert _served(_samples(merged)) == 10
    merged.update(1, late)
    assert _served(_samples(merged)) == 12
    merged.update(1, late)  # the same again adds nothing
    replacement = Metrics()
    _count(replacement, 1)
    merged.update(3, of_registry(replacement.registry))
    assert _served(_samples(merged)) == 13
    merged.ended(3)
    merged.ended(3)  # once only
    assert _served(_samples(merged)) == 13
    # A process that ended before its first report was read: the report counts, once.
    merged.ended(4)
    early = Metrics()
    _count(early, 2)
    merged.update(4, of_registry(early.registry))
    merged.update(4, of_registry(early.registry))
    assert _served(_samples(merged)) == 15 and 4 not in merged.live


def test_gauges_are_summed_lowest_or_the_supervisors_own() -> None:
    def gauge(name: str, value: float) -> list[Any]:
        return [name, "gauge", "", [[name, {}, value]]]

    merged = Merged()
    merged.update(1, [gauge("ccproxy_connections_open", 3), gauge("ccproxy_state_backend_up", 1),
                      gauge("ccproxy_blocked_ips", 5), gauge("ccproxy_tls_certificate_expiry_timestamp_seconds", 9)])
    merged.update(2, [gauge("ccproxy_connections_open", 4), gauge("ccproxy_state_backend_up", 0),
                      gauge("ccproxy_blocked_ips", 5), gauge("ccproxy_tls_certificate_expiry_timestamp_seconds", 9)])
    out = _samples(merged, own=[gauge("ccproxy_blocked_ips", 2), gauge("ccproxy_workers_up", 2)])
    assert out[("ccproxy_connections_open", ())] == 7
    assert out[("ccproxy_state_backend_up", ())] == 0
    assert out[("ccproxy_blocked_ips", ())] == 2
    assert out[("ccproxy_tls_certificate_expiry_timestamp_seconds", ())] == 9
    assert out[("ccproxy_workers_up", ())] == 2
    merged.ended(2)  # a gauge of an ended worker is gone with it
    assert _samples(merged)[("ccproxy_connections_open", ())] == 3


def test_label_values_stay_bounded_across_workers_and_their_successors() -> None:
    merged = Merged()
    for pid in range(1, 41):  # 40 workers in turn, each with 64 values of its own
        m = Metrics()
        for i in range(64):
            m.observe({"ccproxy_event": "security_alert", "rule": f"w{pid}r{i}"})
        merged.update(pid, of_registry(m.registry))
        merged.ended(pid)
    out = _samples(merged)
    alerts = {labels: v for (name, labels), v in out.items() if name == "ccproxy_security_alerts_total"}
    assert len(alerts) == 65 and alerts[(("rule", "other"),)] == 40 * 64 - 64
    assert sum(alerts.values()) == 40 * 64


def test_the_service_scrape_sums_the_workers_and_adds_the_supervisors_gauges(tmp_path: Path) -> None:
    supervisor, workers, clock = _service(tmp_path, metrics=True)
    for w, n in zip(workers, (3, 7), strict=True):
        assert w.metrics is not None
        _count(w.metrics, n)
    got: list[Samples] = []
    supervisor.admin.ask().addCallback(lambda _: got.append(_parse(supervisor.admin.exposition())))
    out = got[0]
    assert _served(out) == 10
    assert out[("ccproxy_workers_up", ())] == 2 and out[("ccproxy_workers_configured", ())] == 2
    assert out[("ccproxy_connections_open", ())] == 6
    assert out[("process_resident_memory_bytes", ())] > 0
    # Each worker also reports on its own every second, so a worker killed outright loses at most
    # that much.
    assert workers[0].metrics is not None
    _count(workers[0].metrics, 5)
    clock.advance(1.0)
    supervisor.worker_ended(workers[0].slot, SimpleNamespace(value=SimpleNamespace(signal=9)))
    assert _served(_parse(supervisor.admin.exposition())) == 15
    assert _parse(supervisor.admin.exposition())[("ccproxy_worker_restarts_total", ())] == 1
    assert workers[0].slot.restart is not None
    workers[0].slot.restart.cancel()
    for w in workers:
        w.admin.stop()


def test_operations_are_routed_to_their_side() -> None:
    assert TO_WORKER.isdisjoint(TO_SUPERVISOR)
    assert {"collect", "incident", "unblock"} <= TO_WORKER and {"figures", "rule-block"} <= TO_SUPERVISOR


def test_a_follower_writes_nothing_and_reports_nothing(tmp_path: Path, seen_events: list[dict[str, Any]]) -> None:
    clock = task.Clock()
    blocklist = BlockList()
    follower = IncidentState(str(tmp_path), blocklist, clock)
    follower.keeper = False
    sent: list[tuple[str, float, str]] = []
    follower.forward_rule_block = lambda *block: sent.append(block)
    follower.mirror({"blocks": [{"target": "10.0.0.0/8", "until": None, "reason": "r", "by": "uid=0",
                                 "created": 0.0}],
                     "emergency": {"enabled": True, "since": 5.0, "by": "uid=0", "changed": 5.0}})
    follower.block_by_rule("203.0.113.9", 60, "scan")
    clock.advance(5)
    follower.stop()
    assert blocklist.is_blocked("10.1.2.3", clock.seconds()) and blocklist.is_blocked("203.0.113.9", clock.seconds())
    assert follower.emergency and follower.emergency_since == 5.0
    assert sent == [("203.0.113.9", 60, "scan")]
    assert list(tmp_path.iterdir()) == [] and seen_events == []


def test_a_switch_published_by_another_instance_is_taken_by_the_supervisor_for_every_worker(tmp_path: Path) -> None:
    supervisor, workers, clock = _service(tmp_path)
    shared = {"enabled": True, "since": clock.seconds(), "by": "uid=0 on another host", "changed": clock.seconds()}

    class _Redis:
        async def fetch(self) -> Any:
            return shared

    workers[0].incident.remote = _Redis()
    clock.advance(1.0)
    assert supervisor.admin.incident.emergency and supervisor.admin.incident.emergency_by == "uid=0 on another host"
    assert all(w.incident.emergency for w in workers) and workers[1].emergencies == [True]
    assert json.loads((tmp_path / "incident.json").read_text())["emergency"]["enabled"] is True
    seen = len([m for m in workers[0].to_supervisor.sent if m["op"] == "emergency-seen"])
    clock.advance(1.0)  # taken: not sent again
    assert len([m for m in workers[0].to_supervisor.sent if m["op"] == "emergency-seen"]) == seen == 1
    for w in workers:
        w.admin.stop()


def test_the_metrics_listener_waits_for_its_port_to_be_free() -> None:
    from twisted.internet.error import CannotListenError

    from ccproxy.admin.service import MetricsListener

    class _Reactor(task.Clock):
        def __init__(self) -> None:
            super().__init__()
            self.taken = 2
            self.tries = 0

        def listenTCP(self, port: int, factory: Any, interface: str = "") -> Any:
            self.tries += 1
            if self.taken:
                self.taken -= 1
                raise CannotListenError(interface, port, OSError(98, "Address already in use"))
            return SimpleNamespace(getHost=lambda: SimpleNamespace(host=interface, port=port),
                                   stopListening=lambda: "stopped")

    reactor = _Reactor()
    listener = MetricsListener(reactor, SimpleNamespace(host="127.0.0.1", port=9464), object()).start()
    assert listener.port is None and reactor.tries == 1
    reactor.advance(1.0)
    assert listener.port is None and reactor.tries == 2
    reactor.advance(1.0)
    assert listener.port is not None and reactor.tries == 3
    reactor.advance(5.0)
    assert reactor.tries == 3 and listener.stopListening() == "stopped"
    # Stopped while still waiting: no more tries.
    reactor.taken = 1
    waiting = MetricsListener(reactor, SimpleNamespace(host="127.0.0.1", port=9464), object()).start()
    assert waiting.stopListening() is None
    reactor.advance(5.0)
    assert reactor.tries == 4 and waiting.port is None
