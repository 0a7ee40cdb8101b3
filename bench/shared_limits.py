"""The cross-worker limiter's cost per request, without the network: CPU time, deterministic enough
to compare two versions on a busy machine.

    python bench/shared_limits.py [--requests 20000] [--per-turn 1 8]

Every limit of bench/workers.py's every-policy-on config (per-address and per-key rates, a daily
quota, token budgets, the auto-block probe), planned as the limits layer plans them. For each
request: the decision, the token-budget check, and the charge of its usage once it ends, each
  - in one process: `MemoryStore.decide` and `MemoryStore.tokens`;
  - across workers: the worker's `SharedStore` questions, framed and JSON-encoded as on the control
    channel, decided by the supervisor's `StateOwner` and answered back (the socket itself excluded).
`--per-turn` is how many requests reach a worker in one reactor turn (they share one message); their
usage is charged either in a turn of their own, or in the next turn, as the next requests arrive
(the charges then ride with the questions).
Prints CPU microseconds per request, worker and supervisor sides apart.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from twisted.internet import defer, task
from twisted.internet.testing import StringTransport

from bench.workers import ALL_ON
from ccproxy.blocklist import BlockList
from ccproxy.config import parse
from ccproxy.context import Identity
from ccproxy.limits._memory import MemoryStore
from ccproxy.limits._plan import Planner, token_budgets
from ccproxy.workers.channel import Channel
from ccproxy.workers.state import SharedStore, StateOwner

T0 = 1_800_000_000.0


class _Pair:
    """A worker's and the supervisor's ends of one control channel; bytes moved by hand, so each
    side's CPU time is measured apart."""

    def __init__(self, clock: task.Clock) -> None:
        self.owner = StateOwner(100_000, lambda ip, until: None)
        self.store = SharedStore(clock, BlockList())
        self.worker = Channel(self._to_worker, lambda: None)
        self.supervisor = Channel(self._to_supervisor, lambda: None)
        self.worker_out, self.supervisor_out = StringTransport(), StringTransport()
        self.worker.makeConnection(self.worker_out)
        self.supervisor.makeConnection(self.supervisor_out)
        self.store.connect(self.worker.send)
        self.worker_cpu = self.supervisor_cpu = 0.0

    def _to_supervisor(self, message: dict[str, Any]) -> None:
        # What Supervisor.message does with the limiter's questions.
        op, send = message["op"], self.supervisor.send
        if op == "decide":
            self.owner.charge_all(message.get("charges", ()))
            send("decided", id=message.get("id"), answers=self.owner.decide_all(message["items"]))
        elif op == "charge":
            self.owner.charge_all(message["items"])

    def _to_worker(self, message: dict[str, Any]) -> None:
        # What Worker.handle does with the answers.
        if message["op"] == "decided":
            self.store.asker.answered(message)

    def carry(self) -> None:
        """Move what the worker wrote to the supervisor, and the answers back."""
        started = time.process_time()
        data = self.worker_out.value()
        self.worker_out.clear()
        self.supervisor.dataReceived(data)
        answered = time.process_time()
        self.supervisor_cpu += answered - started
        data = self.supervisor_out.value()
        self.supervisor_out.clear()
        self.worker.dataReceived(data)


def plan(count: int) -> list[tuple[str, Any, Any, Any]]:
    config = parse({**ALL_ON, "server": {"tls": {"enabled": False}}}, environ={"BENCH_CLIENT_KEY": "bench-client-key"}).limits
    planner = Planner(config)
    out = []
    for i in range(count):
        ip = f"10.0.{i % 7}.{i % 50}"
        identity = Identity(key_id=f"key-{i % 3}")
        limits, probe = planner.plan(ip, identity, T0)
        out.append((ip, limits, probe, token_budgets(config, identity, T0)))
    return out


def in_process(requests: list[tuple[str, Any, Any, Any]]) -> float:
    store = MemoryStore(100_000)
    started = time.process_time()
    for n, (_, limits, probe, budgets) in enumerate(requests):
        now = T0 + n * 1e-4
        store.decide(now, limits, probe)
        store.tokens(now, budgets)
        store.charge(now, budgets, 20)
    return time.process_time() - started


def shared(requests: list[tuple[str, Any, Any, Any]], per_turn: int, overlap: bool = False) -> tuple[float, float]:
    """`overlap`: each turn's requests end (and are charged) in the next turn, as the next ones arrive;
    otherwise in a turn of their own."""
    clock = task.Clock()
    pair = _Pair(clock)

    async def one(now: float, ip: str, limits: Any, probe: Any, budgets: Any) -> None:
        await pair.store.check(now, ip, limits, probe, budgets)

    def charge(first: int, turn: list[tuple[str, Any, Any, Any]]) -> None:
        for n, (_, _, _, budgets) in enumerate(turn):  # each request's usage, charged when it ends
            pair.store.charge(T0 + (first + n) * 1e-4, budgets, 20)

    started = time.process_time()
    ended: tuple[int, list[tuple[str, Any, Any, Any]]] | None = None
    for first in range(0, len(requests), per_turn):
        turn = requests[first:first + per_turn]
        if ended is not None:
            charge(*ended)
        for n, (ip, limits, probe, budgets) in enumerate(turn):
            defer.ensureDeferred(one(T0 + (first + n) * 1e-4, ip, limits, probe, budgets))
        clock.advance(0)  # the questions leave at the end of the turn
        pair.carry()
        if overlap:
            ended = (first, turn)
            continue
        charge(first, turn)
        clock.advance(0)
        pair.carry()
    if ended is not None:
        charge(*ended)
        clock.advance(0)
        pair.carry()
    total = time.process_time() - started
    return total - pair.supervisor_cpu, pair.supervisor_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--per-turn", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    requests = plan(args.requests)
    n = len(requests)
    print(f"== {n} requests: decision, token check and charge; CPU us per request (best of {args.rounds}) ==")
    local = min(in_process(requests) for _ in range(args.rounds))
    print(f"one process (MemoryStore)                      {1e6 * local / n:6.1f} us")
    for overlap in (False, True):
        for per_turn in args.per_turn:
            worker, supervisor = min((shared(requests, per_turn, overlap) for _ in range(args.rounds)), key=sum)
            when = "charged with the next turn" if overlap else "charged in a turn of their own"
            print(f"across workers, {per_turn:>3} request(s) per turn, {when:30}: worker {1e6 * worker / n:6.1f} us"
                  f" + supervisor {1e6 * supervisor / n:6.1f} us = {1e6 * (worker + supervisor) / n:6.1f} us")

if __name__ == "__main__":
    main()
