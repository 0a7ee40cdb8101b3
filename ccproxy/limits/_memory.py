"""Limits kept in this process: exact, synchronous, bounded.

The table holds one entry per (limit, subject) with its state and the time the state stops
mattering (a GCRA entry whose bucket is full again, a quota whose day is over): dropping it then
changes no decision. Every 16th decision examines the 32 oldest entries and drops those that are
spent (moving the others to the back), so the table is swept continuously while traffic flows;
with no traffic, the limiter's housekeeping tick sweeps it (`sweep`), so what a burst left is
dropped once spent even if no request follows.
Past `max_entries` the least recently used entry is forgotten: that subject starts again from a
full bucket. Memory is therefore at most about `max_entries` x 200 bytes (100,000 entries: ~20 MB),
whatever the number of addresses.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from ccproxy.limits._core import (
    Decision,
    Limit,
    Rate,
    combine,
    quota_outcome,
    rate_outcome,
    token_charge,
    token_expiry,
    token_outcome,
)
from ccproxy.limits._plan import MINUTE as BLOCK_WINDOW
from ccproxy.limits._plan import AutoBlockProbe

# Every `_SWEEP_EVERY` decisions, the `_SWEEP_EVERY * 2` oldest entries are looked at: the same
# two per decision as sweeping each time, for one sweep's fixed cost in sixteen. The bound itself
# never waits for a sweep: an insert into a full table evicts first.
_SWEEP_EVERY = 16
_SWEEP_PER_DECISION = 2
# Entries looked at per housekeeping tick (a second): bounds the tick's work at 100,000 entries.
SWEEP_PER_TICK = 2000


class MemoryStore:
    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        # key -> [state, expires], least recently written first. An OrderedDict, not a dict: taking
        # from the front of a plain dict skips every slot freed there before, which grows.
        self._table: OrderedDict[str, list[float]] = OrderedDict()
        self.evicted = 0
        self._clock = 0.0
        self._until_sweep = _SWEEP_EVERY
        # Auto-block probes: key -> the times of the address's latest requests.
        self._logs: OrderedDict[str, deque[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._table)

    def watched(self) -> int:
        """Addresses whose latest requests are kept for auto-blocking."""
        return len(self._logs)

    def _advance(self, now: float) -> float:
        # Time never runs backwards here (as in Redis): a clock stepped back loses no allowance.
        if now > self._clock:
            self._clock = now
        return self._clock

    def resize(self, max_entries: int) -> None:
        self.max_entries = max_entries
        while len(self._table) > max_entries:
            self._evict()

    def decide(self, now: float, limits: list[Limit], probe: AutoBlockProbe | None = None) -> Decision:
        """Count the request for auto-blocking, then admit it against every limit or none."""
        now = self._advance(now)
        self._until_sweep -= 1
        if not self._until_sweep:
            self._until_sweep = _SWEEP_EVERY
            self._sweep(now, _SWEEP_EVERY * _SWEEP_PER_DECISION)
        if probe is not None:
            blocked = self._count_for_block(now, probe)
            if blocked is not None:
                return blocked
        table = self._table
        outcomes = []
        # Inlined lookups: this loop is most of a memory decision's cost.
        for limit in limits:
            entry = table.get(limit.key)
            state = entry[0] if entry is not None and entry[1] > now else None
            if type(limit) is Rate:
                outcomes.append(rate_outcome(limit, state, now))
            else:
                outcomes.append(quota_outcome(limit, state, now))  # type: ignore[arg-type]
        decision = combine(limits, outcomes)
        if decision.allowed:
            for limit, o in zip(limits, outcomes, strict=True):
                self._put(limit.key, o.state, o.state if type(limit) is Rate else limit.reset_at)  # type: ignore[union-attr]
        return decision

    def tokens(self, now: float, budgets: list[Limit], charge: int = 0) -> Decision:
        """Charge `charge` tokens to every budget (none: only ask), then say whether they admit."""
        now = self._advance(now)
        outcomes = []
        for limit in budgets:
            state = self._state(limit.key, now)
            if charge:
                state = token_charge(limit, state, now, charge)
                self._put(limit.key, state, token_expiry(limit, state, now))
            outcomes.append(token_outcome(limit, state, now))
        return combine(budgets, outcomes)

    def charge(self, now: float, budgets: list[Limit], tokens: int) -> None:
        """Charge `tokens` to every budget, without asking whether they still admit (the request
        is over: nobody waits for the answer)."""
        now = self._advance(now)
        for limit in budgets:
            state = token_charge(limit, self._state(limit.key, now), now, tokens)
            self._put(limit.key, state, token_expiry(limit, state, now))

    def _count_for_block(self, now: float, probe: AutoBlockProbe) -> Decision | None:
        """Exact: the request that makes more than `count` in any `period` blocks. The times of an
        address's last count + 1 requests are kept (dropped once a period old), so what is held is
        bounded by the requests of the last minute or two, and by `max_entries` addresses."""
        rate = probe.rate
        logs = self._logs
        times = logs.get(rate.key)
        if times is None:
            if len(logs) >= self.max_entries:
                logs.popitem(last=False)
            times = logs[rate.key] = deque(maxlen=rate.count + 1)
        else:
            logs.move_to_end(rate.key)
        times.append(now)
        if len(times) <= rate.count or times[0] <= now - rate.period:
            return None
        del logs[rate.key]
        until = now + probe.duration
        return Decision(False, rate, 0, probe.duration, probe.duration, blocked_until=until, new_block=True)

    def _state(self, key: str, now: float) -> float | None:
        entry = self._table.get(key)
        if entry is None or entry[1] <= now:
            return None
        return entry[0]

    def _put(self, key: str, state: float, expires: float) -> None:
        table = self._table
        entry = table.get(key)
        if entry is not None:
            entry[0], entry[1] = state, expires
            table.move_to_end(key)
            return
        if len(table) >= self.max_entries:
            self._evict()
        table[key] = [state, expires]

    def _evict(self) -> None:
        self._table.popitem(last=False)
        self.evicted += 1

    def sweep(self, now: float, count: int = SWEEP_PER_TICK) -> None:
        """Drop spent entries among the `count` oldest of each table (at idle, from the limiter's tick)."""
        self._sweep(max(now, self._clock), count)

    def _sweep(self, now: float, count: int) -> None:
        logs = self._logs
        for _ in range(min(count, len(logs))):
            key = next(iter(logs))
            if logs[key][-1] > now - BLOCK_WINDOW:
                logs.move_to_end(key)
            else:
                del logs[key]
        table = self._table
        for _ in range(min(count, len(table))):
            key = next(iter(table))
            if table[key][1] > now:
                table.move_to_end(key)
            else:
                del table[key]
