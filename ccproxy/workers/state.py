"""Limits exact across workers: the supervisor owns one MemoryStore, workers ask it over their
control channel.

A worker's `SharedStore` has the interface of the Redis store (`decide` is asynchronous): requests
that arrive in the same reactor turn go in one message and come back in one answer, each decided on
its own, in order, by `MemoryStore.decide` in the supervisor, the same arithmetic as one process.
Token budgets likewise, in the same store: a request's budgets ride on its `decide` question (the
supervisor checks them, as `MemoryStore.tokens`, right after the request limits admit it: one
round trip, not two), and the usage is charged when the request ends by a `charge` message that
needs no answer, batched per reactor turn like the questions.
Blocks made there are also remembered there (a blocked address is refused whichever worker asks)
and pushed to every worker at once, so each refuses the address at accept.

Measured choice (see docs/operations.md, "Workers"): a Unix socket round trip batched per reactor
turn rather than shared memory, which Python can only make exact with a lock taken on every request
by every process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer

from ccproxy.blocklist import BlockList
from ccproxy.limits._core import Decision, Limit, Quota, Rate
from ccproxy.limits._memory import MemoryStore
from ccproxy.limits._plan import AutoBlockProbe
from ccproxy.limits._redis import RedisUnavailable

# Requests decided by one message at most; more in one reactor turn make several messages.
MAX_BATCH = 256
_PROBE = -2  # the answer's limit is the auto-block probe
_NONE = -1


def _rows(limits: list[Limit]) -> tuple[tuple[Any, ...], ...]:
    # Built afresh each time: measured cheaper than any cache of them.
    return tuple([("r", limit.name, limit.key, limit.count, limit.period, limit.burst) if isinstance(limit, Rate)
                  else ("q", limit.name, limit.key, limit.count, limit.reset_at, 0) for limit in limits])


# The supervisor meets the same rows again and again (a client's, on each of its requests): the
# limits of a whole row list, and each probe, are built once. Bounded: emptied when full.
_DECODED: dict[Any, Any] = {}
_DECODED_MAX = 10_000


def _limits(rows: Any) -> list[Limit]:
    key = rows if type(rows) is tuple else tuple(tuple(row) for row in rows)  # lists: the JSON form
    found: list[Limit] | None = _DECODED.get(key)
    if found is None:
        if len(_DECODED) >= _DECODED_MAX:
            _DECODED.clear()
        found = []
        for kind, name, subject, count, period, burst in key:
            found.append(Rate(name, subject, count, period, burst) if kind == "r"
                         else Quota(name, subject, count, period))
        _DECODED[key] = found
    return found


def _probe(ip: str, p: Any) -> AutoBlockProbe:
    key = ("p", ip, *p)
    probe: AutoBlockProbe | None = _DECODED.get(key)
    if probe is None:
        if len(_DECODED) >= _DECODED_MAX:
            _DECODED.clear()
        probe = AutoBlockProbe(ip, Rate("auto_block", p[0], p[1], p[2], p[3]), p[4])
        _DECODED[key] = probe
    return probe


def encode(now: float, ip: str, limits: list[Limit], probe: AutoBlockProbe | None,
           budgets: list[Limit] | None = None) -> tuple[Any, ...]:
    p = None
    if probe is not None:
        r = probe.rate
        p = (r.key, r.count, r.period, r.burst, probe.duration)
    if budgets:
        return (now, ip, p, _rows(limits), _rows(budgets))
    return (now, ip, p, _rows(limits))


def decode(item: Any) -> tuple[float, str, list[Limit], AutoBlockProbe | None, list[Limit]]:
    now, ip, p, rows = item[:4]
    probe = None if p is None else _probe(ip, p)
    budgets = _limits(item[4]) if len(item) > 4 else []
    return now, ip, _limits(rows), probe, budgets


def encode_charge(now: float, budgets: list[Limit], tokens: int) -> tuple[Any, ...]:
    return (now, tokens, _rows(budgets))


def decode_charge(item: Any) -> tuple[float, list[Limit], int]:
    now, tokens, rows = item
    return now, _limits(rows), tokens


def answer(decision: Decision, limits: list[Limit], probe: AutoBlockProbe | None) -> list[Any]:
    index = _NONE
    if decision.limit is not None:
        if probe is not None and decision.limit is probe.rate:
            index = _PROBE
        else:
            index = next(i for i, limit in enumerate(limits) if limit is decision.limit)
    return [int(decision.allowed), index, decision.remaining, decision.reset_after, decision.retry_after,
            decision.blocked_until, int(decision.new_block)]


def unanswer(row: list[Any], limits: list[Limit], probe: AutoBlockProbe | None) -> Decision:
    allowed, index, remaining, reset_after, retry_after, blocked_until, new_block = row
    limit: Limit | None = None
    if index == _PROBE and probe is not None:
        limit = probe.rate
    elif index >= 0:
        limit = limits[index]
    return Decision(bool(allowed), limit, int(remaining), float(reset_after), float(retry_after),
                    None if blocked_until is None else float(blocked_until), bool(new_block))


class StateOwner:
    """In the supervisor: the one store every worker's decisions go through."""

    def __init__(self, max_entries: int, announce_block: Callable[[str, float], None]) -> None:
        self.store = MemoryStore(max_entries)
        self.blocks: dict[str, float] = {}
        self.announce_block = announce_block

    def decide_all(self, items: list[list[Any]]) -> list[list[Any]]:
        return [self.decide(*decode(item)) for item in items]

    def charge_all(self, items: list[list[Any]]) -> None:
        """Requests' usage, charged in the order it arrives: what one worker charges, the next
        question through any worker sees."""
        for item in items:
            now, budgets, tokens = decode_charge(item)
            self.store.charge(now, budgets, tokens)

    def decide(self, now: float, ip: str, limits: list[Limit], probe: AutoBlockProbe | None,
               budgets: list[Limit] | None = None) -> list[Any]:
        """The request limits' answer; with `budgets`, followed by theirs once the limits admit the
        request (as the limits layer asks them in one process)."""
        row = self._decide(now, ip, limits, probe)
        if budgets and row[0] and row[5] is None:
            row.append(answer(self.store.tokens(now, budgets), budgets, None))
        return row

    def _decide(self, now: float, ip: str, limits: list[Limit], probe: AutoBlockProbe | None) -> list[Any]:
        until = self.blocks.get(ip)
        if until is not None:
            if until > now:
                wait = until - now
                rate = probe.rate if probe is not None else None
                return answer(Decision(False, rate, 0, wait, wait, blocked_until=until), limits, probe)
            del self.blocks[ip]
        decision = self.store.decide(now, limits, probe)
        if decision.new_block and decision.blocked_until is not None:
            self.blocks[ip] = decision.blocked_until
            self.announce_block(ip, decision.blocked_until)
        if len(self.blocks) > self.store.max_entries:
            self.blocks = {k: v for k, v in self.blocks.items() if v > now}
        return answer(decision, limits, probe)


class Asker:
    """Questions to the supervisor, batched: those asked in one reactor turn leave in one message
    (`op`, with `items`) and are answered in one (`answers`, in the same order). `schedule`
    arranges the end-of-turn `flush` (one call for everything a worker sends in a turn); `extra`
    gives the fields that ride along with each batch."""

    def __init__(self, op: str, schedule: Callable[[], None]) -> None:
        self.op = op
        self.send: Callable[..., None] | None = None
        self.extra: Callable[[], dict[str, Any]] | None = None
        self._schedule = schedule
        self._pending: list[Any] = []
        self._deferreds: list[defer.Deferred[Any]] = []
        self._waiting: dict[int, list[defer.Deferred[Any]]] = {}
        self._next = 0

    def ask(self, item: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        if self.send is None:
            d.errback(RedisUnavailable("the supervisor is not reachable"))
            return d
        self._pending.append(item)
        self._deferreds.append(d)
        if len(self._pending) >= MAX_BATCH:
            self.flush()
        else:
            self._schedule()
        return d

    def flush(self) -> bool:
        """Send what was asked; False when there was nothing to send."""
        if not self._pending:
            return False
        items, waiting = self._pending, self._deferreds
        self._pending, self._deferreds = [], []
        if self.send is None:
            _fail(waiting)
            return False
        self._next += 1
        self._waiting[self._next] = waiting
        if self.extra is None:
            self.send(self.op, id=self._next, items=items)
        else:
            self.send(self.op, id=self._next, items=items, **self.extra())
        return True

    def answered(self, message: dict[str, Any]) -> None:
        waiting = self._waiting.pop(message.get("id", 0), None)
        if not waiting:
            return
        answers = message.get("answers")
        if not isinstance(answers, list | tuple) or len(answers) != len(waiting):
            _fail(waiting, "the supervisor's answer does not match the questions")
            return
        for d, row in zip(waiting, answers, strict=True):
            if not d.called:
                d.callback(row)

    def lost(self) -> None:
        self.send = None
        pending = self._deferreds
        self._pending, self._deferreds = [], []
        for waiting in self._waiting.values():
            pending += waiting
        self._waiting.clear()
        _fail(pending)


def _fail(waiting: list[defer.Deferred[Any]], reason: str = "the supervisor is gone") -> None:
    """Each question fails as a backend outage does (the limits layer's `on_backend_error`)."""
    for d in waiting:
        if not d.called:
            d.errback(RedisUnavailable(reason))


class SharedStore:
    """In a worker: the supervisor's store, asked over the control channel."""

    def __init__(self, reactor: Any, blocklist: BlockList) -> None:
        self.reactor = reactor
        self.blocklist = blocklist
        # Everything a worker says in one reactor turn leaves at its end, at once: the slots given
        # back, the token charges of the requests that ended (with the turn's questions, ahead of
        # them, when there are any), the questions, the connections asking for a slot.
        self._turn_call: Any = None
        self.asker = Asker("decide", self._schedule)
        self.asker.extra = self._take_charges
        # Connection slots (see ccproxy.workers.gate): asked for, and given back, in batches too.
        self.admissions = Asker("admit", self._schedule)
        self._released: list[str] = []
        # Token charges: one-way.
        self._charges: list[tuple[Any, ...]] = []

    def connect(self, send: Callable[..., None] | None) -> None:
        self.asker.send = self.admissions.send = send

    def lost(self) -> None:
        self.connect(None)
        self.asker.lost()
        self.admissions.lost()
        self._released = []
        self._charges = []

    def _schedule(self) -> None:
        if self._turn_call is None:
            self._turn_call = self.reactor.callLater(0, self._end_of_turn)

    def _end_of_turn(self) -> None:
        self._turn_call = None
        send = self.asker.send
        if self._released:
            hosts, self._released = self._released, []
            if send is not None:
                send("release", hosts=hosts)
        if not self.asker.flush() and self._charges:
            items = self._take_charges()["charges"]
            if send is not None:
                send("charge", items=items)
        self.admissions.flush()

    def _take_charges(self) -> dict[str, Any]:
        items, self._charges = self._charges, []
        return {"charges": items}

    def release(self, host: str) -> None:
        self._released.append(host)
        self._schedule()

    async def decide(self, now: float, limits: list[Limit], probe: AutoBlockProbe | None = None,
                     ip: str = "") -> Decision:
        ip = probe.ip if probe is not None else ip
        row = await self.asker.ask(encode(now, ip, limits, probe))
        return unanswer(row[:7], limits, probe)

    async def check(self, now: float, ip: str, limits: list[Limit], probe: AutoBlockProbe | None,
                    budgets: list[Limit]) -> tuple[Decision, Decision | None]:
        """The request limits' decision and, if they admit the request, the token budgets' (None
        without budgets): one question."""
        row = await self.asker.ask(encode(now, ip, limits, probe, budgets))
        decision = unanswer(row[:7], limits, probe)
        return decision, unanswer(row[7], budgets, None) if len(row) > 7 else None

    def charge(self, now: float, budgets: list[Limit], tokens: int) -> None:
        """Charge a finished request's usage; raises RedisUnavailable when the supervisor is gone."""
        if self.asker.send is None:
            raise RedisUnavailable("the supervisor is not reachable")
        self._charges.append(encode_charge(now, budgets, tokens))
        self._schedule()

    def blocked(self, ip: str, until: float) -> None:
        """A block made through another worker: refuse the address at accept here too."""
        self.blocklist.block(ip, until)
