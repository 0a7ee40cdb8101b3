"""The arithmetic of one decision, shared by both backends.

A `Rate` is a GCRA (generic cell rate algorithm): a request is due every `interval` seconds and may
come up to `depth` seconds early, so `burst` requests pass at once from idle and then one per
interval. Its state is one number, the theoretical arrival time (TAT). A `Quota` is a count that
starts again at a fixed time of day. The Redis Lua script (`_redis.py`) does the same operations in
the same order on the same doubles, so both backends decide alike to the last bit.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import attrs

# Float slack when comparing times, so the request exactly on its slot is not refused by rounding.
EPS = 1e-6


@attrs.frozen
class Rate:
    name: str  # which limit, as events and tests name it: "global_minute", "per_ip_hour", ...
    key: str
    count: int
    period: float
    burst: int
    # Derived once: a rate is built once per client and used for every one of its requests.
    interval: float = attrs.field(init=False, eq=False)
    depth: float = attrs.field(init=False, eq=False)

    def __attrs_post_init__(self) -> None:
        interval = self.period / self.count
        object.__setattr__(self, "interval", interval)
        object.__setattr__(self, "depth", self.burst * interval)


@attrs.frozen
class Quota:
    name: str
    key: str  # carries the index of the day, so a new day is a new key
    count: int
    reset_at: float  # absolute time the day ends


Limit = Rate | Quota


class Outcome(NamedTuple):
    """What one limit says about one request (a tuple: built several times per request, and an
    attrs class's frozen __init__ costs twice as much)."""

    allowed: bool
    remaining: int
    reset_after: float  # seconds until the limit is whole again
    retry_after: float  # seconds until it admits again (0 when allowed)
    state: float  # the state to store if the whole request is admitted


@attrs.frozen
class Decision:
    allowed: bool
    limit: Limit | None = None  # the refusing limit, or the tightest one when admitted
    remaining: int = 0
    reset_after: float = 0.0
    retry_after: float = 0.0
    blocked_until: float | None = None  # the client's address is blocked until then
    new_block: bool = False  # this decision made the block


def rate_outcome(rate: Rate, tat: float | None, now: float) -> Outcome:
    interval, depth = rate.interval, rate.depth
    start = now if tat is None or tat < now else tat
    new_tat = start + interval
    ahead = new_tat - now
    if ahead > depth + EPS:
        return Outcome(False, 0, start - now, ahead - depth, start)
    remaining = math.floor((depth - ahead) / interval + EPS)
    return Outcome(True, remaining, ahead, 0.0, new_tat)


def quota_outcome(quota: Quota, used: float | None, now: float) -> Outcome:
    count = used or 0.0
    left = quota.reset_at - now
    if count + 1 > quota.count:
        return Outcome(False, 0, left, left, count)
    return Outcome(True, int(quota.count - count - 1), left, 0.0, count + 1)


def combine(limits: list[Limit], outcomes: list[Outcome]) -> Decision:
    """One answer for all limits: refused by the one that keeps the client waiting longest,
    otherwise reported by the one with the fewest requests left (on a tie, the one whole again
    latest; on a full tie, the first)."""
    # One pass without key functions: this runs two or three times per request.
    refused: Outcome | None = None
    refused_at = 0
    best: Outcome | None = None
    best_at = 0
    for i, o in enumerate(outcomes):
        if not o.allowed:
            if refused is None or o.retry_after > refused.retry_after:
                refused, refused_at = o, i
        elif refused is None and (
                best is None or o.remaining < best.remaining
                or (o.remaining == best.remaining and o.reset_after > best.reset_after)):
            best, best_at = o, i
    if refused is not None:
        return Decision(False, limits[refused_at], 0, refused.reset_after, refused.retry_after)
    if best is None:
        return Decision(True)
    return Decision(True, limits[best_at], best.remaining, best.reset_after, 0.0)


# Token budgets. A tokens-per-minute budget is a Rate of `count` tokens a minute whose bucket holds
# a whole minute (`burst` = `count`); a daily token quota is a Quota. Unlike requests, a request is
# admitted while the budget is not spent (one token left), and its tokens are charged afterwards,
# when its usage is known: one request may overshoot, and the next waits until it is paid back.


def token_outcome(limit: Limit, state: float | None, now: float) -> Outcome:
    """Whether a budget admits a request now (charging nothing)."""
    if isinstance(limit, Rate):
        ahead = max(0.0, (state or now) - now)
        remaining = math.floor((limit.depth - ahead) / limit.interval + EPS)
        if remaining < 1:
            return Outcome(False, 0, ahead, ahead - limit.depth + limit.interval, state or now)
        return Outcome(True, remaining, ahead, 0.0, state or now)
    used = state or 0.0
    left = limit.reset_at - now
    if used >= limit.count:
        return Outcome(False, 0, left, left, used)
    return Outcome(True, int(limit.count - used), left, 0.0, used)


def token_charge(limit: Limit, state: float | None, now: float, tokens: int) -> float:
    """The budget's state after `tokens` were spent."""
    if isinstance(limit, Rate):
        return max(state or now, now) + tokens * limit.interval
    return (state or 0.0) + tokens


def token_expiry(limit: Limit, state: float, now: float) -> float:
    """When a budget's state stops mattering (its bucket full again, its day over)."""
    return state if isinstance(limit, Rate) else limit.reset_at
