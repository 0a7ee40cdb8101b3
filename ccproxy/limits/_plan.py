"""Which limits apply to a request, with the keys their state is stored under.

A rate's key carries its parameters: after a reload, an unchanged limit finds its state again and a
changed one starts afresh. A quota's key carries only its tier and day, so raising a quota on reload
keeps what was already used today.
"""

from __future__ import annotations

import math

import attrs

from ccproxy.config.limits import LimitsConfig, TierLimits, WindowLimits
from ccproxy.context import Identity
from ccproxy.limits._core import Limit, Quota, Rate

MINUTE = 60.0
HOUR = 3600.0
DAY = 86400.0


def default_burst(per_minute: int) -> int:
    """Without a configured burst: a tenth of the minute's allowance, so that a minute window never
    sees much more than its limit (GCRA admits at most `count + burst - 1` in any window)."""
    return max(1, math.ceil(per_minute / 10))


@attrs.frozen
class AutoBlockProbe:
    """Counts every request of an address; more than `rate.count` in any `rate.period` blocks the
    address for `duration`."""

    ip: str
    rate: Rate
    duration: float


def window_rates(scope: str, subject: str, limits: WindowLimits) -> list[Limit]:
    """A scope's minute and hour limits.

    The minute limit takes `burst` (default: a tenth of it). The hour limit may absorb one full
    minute's allowance at once (and no more), so the minute limit, not the hour one, shapes short
    bursts, while no hour window admits more than `requests_per_hour` + one minute's allowance.
    """
    out: list[Limit] = []
    per_minute, per_hour = limits.requests_per_minute, limits.requests_per_hour
    minute_burst = limits.burst or (default_burst(per_minute) if per_minute else 1)
    if per_minute:
        out.append(_rate(f"{scope}_minute", subject, per_minute, MINUTE, minute_burst))
    if per_hour:
        if per_minute:
            hour_burst = min(per_hour, per_minute + minute_burst - 1)
        else:
            hour_burst = min(per_hour, limits.burst or default_burst(per_hour))
        out.append(_rate(f"{scope}_hour", subject, per_hour, HOUR, hour_burst))
    return out


def _rate(name: str, subject: str, count: int, period: float, burst: int) -> Rate:
    return Rate(name, f"r:{name}:{count}:{burst}:{subject}", count, period, burst)


def day_quota(name: str, subject: str, count: int, now: float, reset_offset: float) -> Quota:
    day = math.floor((now - reset_offset) / DAY)
    return Quota(name, f"q:{name}:{int(reset_offset)}:{subject}:{day}", count, (day + 1) * DAY + reset_offset)


def tier_limits(config: LimitsConfig, identity: Identity, now: float) -> list[Limit]:
    out: list[Limit] = []
    tier: TierLimits | None = config.tier(identity.tier) or config.tier("default")
    subject = identity.key_id
    if tier is not None:
        if tier.requests_per_minute:
            burst = tier.burst or default_burst(tier.requests_per_minute)
            out.append(_rate("per_key_minute", f"{tier.name}:{subject}", tier.requests_per_minute, MINUTE, burst))
        if tier.daily_quota:
            out.append(day_quota("daily_quota", subject, tier.daily_quota, now, config.daily_reset))
    if identity.rate_limit:
        own = identity.rate_limit
        out.append(_rate("key_rate_limit", subject, own, MINUTE, default_burst(own)))
    return out


def token_budgets(config: LimitsConfig, identity: Identity | None, now: float) -> list[Limit]:
    """A key's token budgets: `tokens_per_minute` (a minute's worth may be spent at once) and
    `daily_token_quota`, from its tier (or the default tier)."""
    if not config.enabled or identity is None:
        return []
    tier = config.tier(identity.tier) or config.tier("default")
    if tier is None:
        return []
    out: list[Limit] = []
    subject = f"{tier.name}:{identity.key_id}"
    if tier.tokens_per_minute:
        count = tier.tokens_per_minute
        out.append(Rate("tokens_per_minute", f"t:{count}:{subject}", count, MINUTE, count))
    if tier.daily_token_quota:
        out.append(day_quota("daily_token_quota", f"tokens:{identity.key_id}", tier.daily_token_quota, now,
                             config.daily_reset))
    return out


def limits_for(config: LimitsConfig, ip: str, identity: Identity | None, now: float) -> list[Limit]:
    if not config.enabled:
        return []
    out: list[Limit] = []
    if config.global_ is not None:
        out += window_rates("global", "*", config.global_)
    if config.per_ip is not None:
        out += window_rates("per_ip", ip, config.per_ip)
    if identity is not None:
        out += tier_limits(config, identity, now)
    return out


def probe_for(config: LimitsConfig, ip: str) -> AutoBlockProbe | None:
    block = config.auto_block
    if not block.enabled:
        return None
    # Counted exactly in a sliding minute (a log of times, not a GCRA: see the stores).
    rate = Rate("auto_block", f"al:{block.threshold}:{ip}", block.threshold, MINUTE, block.threshold)
    return AutoBlockProbe(ip, rate, block.duration)


_PLAN_CACHE = 8192
# A client's plan is forgotten between one and two of these after its last request.
PLAN_TTL = 30.0


class Planner:
    """`limits_for` and `probe_for`, built from parts: the global limits once, each address's and
    each key's limits remembered for recent clients (building them is a good part of a decision's
    cost). Each cache is cleared when full, so it stays small under a flood of addresses; and it
    is aged (`age`, from the limiter's housekeeping): what no request used for a `PLAN_TTL` goes,
    so the clients of a burst are not held for the daemon's life."""

    def __init__(self, config: LimitsConfig) -> None:
        self.config = config
        on = config.enabled
        self._global = window_rates("global", "*", config.global_) if on and config.global_ else []
        self._by_ip: dict[str, tuple[list[Limit], AutoBlockProbe | None]] = {}
        self._by_key: dict[tuple[object, ...], list[Limit]] = {}
        # The previous generation: used again, an entry moves back; at the next `age`, the rest goes.
        self._old_by_ip: dict[str, tuple[list[Limit], AutoBlockProbe | None]] = {}
        self._old_by_key: dict[tuple[object, ...], list[Limit]] = {}
        self._aged_at: float | None = None

    def __len__(self) -> int:
        """Plans remembered (addresses and keys, both generations)."""
        return len(self._by_ip) + len(self._by_key) + len(self._old_by_ip) + len(self._old_by_key)

    def age(self, now: float) -> None:
        if self._aged_at is None:
            self._aged_at = now
        if now - self._aged_at < PLAN_TTL:
            return
        self._aged_at = now
        self._old_by_ip, self._by_ip = self._by_ip, {}
        self._old_by_key, self._by_key = self._by_key, {}

    def plan(self, ip: str, identity: Identity | None, now: float) -> tuple[list[Limit], AutoBlockProbe | None]:
        found = self._by_ip.get(ip)
        if found is None:
            if len(self._by_ip) >= _PLAN_CACHE:
                self._by_ip.clear()
            found = self._old_by_ip.pop(ip, None)
            if found is None:
                config = self.config
                rates = window_rates("per_ip", ip, config.per_ip) if config.enabled and config.per_ip else []
                found = (rates, probe_for(config, ip))
            self._by_ip[ip] = found
        ip_rates, probe = found
        if identity is None or not self.config.enabled:
            return self._global + ip_rates, probe
        day = math.floor((now - self.config.daily_reset) / DAY)
        key = (identity.key_id, identity.tier, identity.rate_limit, day)
        key_limits = self._by_key.get(key)
        if key_limits is None:
            if len(self._by_key) >= _PLAN_CACHE:
                self._by_key.clear()
            key_limits = self._old_by_key.pop(key, None)
            if key_limits is None:
                key_limits = tier_limits(self.config, identity, now)
            self._by_key[key] = key_limits
        return self._global + ip_rates + key_limits, probe
