"""Connection caps exact across workers: each connection is admitted by the supervisor's counts.

A worker's `SharedGate` first applies everything the single-process gate does (lists, blocks, and
the caps against its own counts, which can only be lower than the total), then asks the supervisor
for a slot before the connection goes any further: the socket is not read, and no TLS work is done,
until the answer comes. A refused connection is closed as the single-process gate closes it, with
the same event. The slot is given back when the connection ends; the slots of a worker that dies
are given back by the supervisor.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from twisted.internet.interfaces import IAddress, ITransport
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from ccproxy.network.gate import Gate
from ccproxy.workers.state import SharedStore

_REFUSALS = ("too_many_connections", "too_many_connections_per_ip")


class SharedGate(Gate):
    def __init__(self, wrapped: Any, holder: Any, clock: Any) -> None:
        super().__init__(wrapped, holder, clock)
        store = holder.current.deps.shared_store
        assert isinstance(store, SharedStore)
        self.link = store
        self.pending = 0  # connections waiting for the supervisor's answer

    def buildProtocol(self, addr: IAddress | None) -> Any:
        counted = super().buildProtocol(addr)
        if counted is None:
            return None
        config = self.config()
        caps = config.ddos
        per_ip = None if config.proxy_protocol else caps.max_connections_per_ip
        if caps.max_connections is None and per_ip is None:
            return counted
        return _Admission(self, counted, counted.host or "", caps.max_connections, per_ip)

    def open_connections(self) -> int:
        return self.total + self.pending


class _Admission(Protocol):
    """Holds a connection, unread, until the supervisor admits it; then hands it to the gate's
    counted protocol and relays to it."""

    def __init__(self, gate: SharedGate, inner: Any, host: str, total: int | None, per_ip: int | None) -> None:
        self.gate = gate
        self.inner = inner
        self.host = host
        self.caps = (total, per_ip)
        self.state = "asking"

    def makeConnection(self, transport: ITransport) -> None:
        super().makeConnection(transport)
        transport.pauseProducing()  # type: ignore[attr-defined]
        self.gate.pending += 1
        d = self.gate.link.admissions.ask([self.host, *self.caps])
        d.addCallbacks(self._answer, self._unanswered)

    def _answer(self, reason: str | None) -> None:
        self.gate.pending -= 1
        if self.state == "lost":
            if reason is None:
                self.gate.link.release(self.host)
            return
        if reason is not None:
            self.state = "refused"
            self.gate.refuse(reason if reason in _REFUSALS else _REFUSALS[0], self.host, self.gate.config())
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        self.state = "admitted"
        self.inner.makeConnection(self.transport)
        if self.state == "admitted":
            self.transport.resumeProducing()  # type: ignore[union-attr]

    def _unanswered(self, failure: Failure) -> None:
        # The supervisor is gone: this worker drains and exits; it takes no new connection.
        self.gate.pending -= 1
        if self.state != "lost":
            self.state = "refused"
            self.transport.abortConnection()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if self.state == "admitted":
            self.inner.dataReceived(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        admitted = self.state == "admitted"
        self.state = "lost"
        if admitted:
            self.inner.connectionLost(reason)
            self.gate.link.release(self.host)


class ConnectionCounts:
    """In the supervisor: open connections of every worker, in total and per address."""

    def __init__(self) -> None:
        self.total = 0
        self.per_ip: Counter[str] = Counter()
        self.held: dict[int, Counter[str]] = {}

    def admit(self, worker: int, host: str, total: int | None, per_ip: int | None) -> str | None:
        if total is not None and self.total >= total:
            return "too_many_connections"
        if per_ip is not None and host and self.per_ip[host] >= per_ip:
            return "too_many_connections_per_ip"
        self.total += 1
        self.per_ip[host] += 1
        self.held.setdefault(worker, Counter())[host] += 1
        return None

    def release(self, worker: int, host: str) -> None:
        held = self.held.get(worker)
        if held is None or held[host] <= 0:
            return  # not one of this worker's (a duplicate, or after the worker was written off)
        held[host] -= 1
        if held[host] == 0:
            del held[host]
        self._drop(host, 1)

    def worker_gone(self, worker: int) -> int:
        """Give back every slot a dead worker held; how many there were."""
        held = self.held.pop(worker, Counter())
        for host, count in held.items():
            self._drop(host, count)
        return sum(held.values())

    def _drop(self, host: str, count: int) -> None:
        self.total -= count
        self.per_ip[host] -= count
        if self.per_ip[host] <= 0:
            del self.per_ip[host]
