"""The limit arithmetic, one suite run against both backends (memory, and a real redis-server).

Time is injected: every decision is made at a time the test chooses, Redis included (the Lua script
takes the caller's clock), so burst, refill, window edges and daily resets are exact.
"""

from __future__ import annotations

import random
from typing import Any

from twisted.internet import defer
from twisted.internet import reactor as real_reactor
from twisted.trial import unittest

from ccproxy.config.limits import RedisState, WindowLimits
from ccproxy.limits._core import Decision, Limit, Quota, Rate
from ccproxy.limits._memory import MemoryStore
from ccproxy.limits._plan import DAY, AutoBlockProbe, day_quota, default_burst, window_rates
from ccproxy.limits._redis import RedisStore
from tests.support.limits import T0
from tests.support.redis import ClassRedis


def rate(name: str, count: int, period: float, burst: int, subject: str = "s") -> Rate:
    return Rate(name, f"r:{name}:{count}:{burst}:{subject}", count, period, burst)


class _StoreTests:
    """Mixed into a TestCase with `decide(now, limits, probe=None, ip='')` -> Deferred[Decision]."""

    def decide(self, now: float, limits: list[Limit], probe: AutoBlockProbe | None = None,
               ip: str = "") -> defer.Deferred[Decision]:
        raise NotImplementedError

    def tokens(self, now: float, budgets: list[Limit], charge: int = 0) -> defer.Deferred[Decision]:
        raise NotImplementedError

    @defer.inlineCallbacks
    def test_token_budget_admits_while_not_spent_and_one_request_may_overshoot(self) -> Any:
        budget = Rate("tokens_per_minute", "t:1000:default:k", 1000, 60.0, 1000)
        fresh = yield self.tokens(T0, [budget])
        self.assertEqual((fresh.allowed, fresh.remaining), (True, 1000))
        # A request costing 1,200 tokens was admitted; it is charged once its usage is known.
        after = yield self.tokens(T0, [budget], 1200)
        self.assertFalse(after.allowed)
        self.assertAlmostEqual(after.retry_after, 72.0 - 60.0 + 0.06, places=6)
        early = yield self.tokens(T0 + 12.0, [budget])
        self.assertFalse(early.allowed)
        paid = yield self.tokens(T0 + 12.06, [budget])
        self.assertEqual((paid.allowed, paid.remaining), (True, 1))
        # Spent tokens come back at the budget's rate: after a minute of rest, all of them.
        rested = yield self.tokens(T0 + 200, [budget])
        self.assertEqual(rested.remaining, 1000)

    @defer.inlineCallbacks
    def test_daily_token_quota(self) -> Any:
        quota = day_quota("daily_token_quota", "tokens:k", 5000, T0, 0.0)
        yield self.tokens(T0, [quota], 3000)
        left = yield self.tokens(T0, [quota])
        self.assertEqual((left.allowed, left.remaining), (True, 2000))
        over = yield self.tokens(T0 + 1, [quota], 2500)
        self.assertFalse(over.allowed)
        self.assertAlmostEqual(over.retry_after, quota.reset_at - T0 - 1, places=6)
        tomorrow = day_quota("daily_token_quota", "tokens:k", 5000, quota.reset_at + 1, 0.0)
        fresh = yield self.tokens(quota.reset_at + 1, [tomorrow])
        self.assertEqual((fresh.allowed, fresh.remaining), (True, 5000))

    async def run_many(self, now: float, limits: list[Limit], n: int) -> list[Decision]:
        return [await self.decide(now, limits) for _ in range(n)]

    @defer.inlineCallbacks
    def test_burst_then_one_per_interval(self) -> Any:
        minute = rate("m", 60, 60.0, 10)
        got = yield defer.ensureDeferred(self.run_many(T0, [minute], 11))
        self.assertEqual([d.allowed for d in got], [True] * 10 + [False])
        self.assertEqual([d.remaining for d in got[:10]], list(range(9, -1, -1)))
        self.assertAlmostEqual(got[10].retry_after, 1.0, places=6)
        self.assertEqual(got[10].limit, minute)
        # Refill: one more after one interval, not before.
        early = yield self.decide(T0 + 0.999, [minute])
        self.assertFalse(early.allowed)
        on_time = yield self.decide(T0 + 1.0, [minute])
        self.assertTrue(on_time.allowed)
        # After a full refill the whole burst is back.
        later = yield defer.ensureDeferred(self.run_many(T0 + 100, [minute], 11))
        self.assertEqual(sum(d.allowed for d in later), 10)

    @defer.inlineCallbacks
    def test_no_double_admission_at_window_edges(self) -> Any:
        # A client hammering 10 times a second for three minutes: no 60-second window, wherever it
        # falls, holds more than the limit plus the burst; a fixed window would allow 2x at its edge.
        limits = window_rates("per_ip", "1.2.3.4", WindowLimits(requests_per_minute=60, burst=10))
        admitted: list[float] = []
        for i in range(1800):
            now = T0 + i * 0.1
            d = yield self.decide(now, limits)
            if d.allowed:
                admitted.append(now)
        worst = max(sum(1 for t in admitted if start <= t < start + 60) for start in admitted)
        self.assertLessEqual(worst, 60 + 10 - 1)
        self.assertEqual(len(admitted), 10 + 179)  # burst + 1/s for 179 s

    @defer.inlineCallbacks
    def test_hour_limit_is_exact(self) -> Any:
        hour = rate("h", 100, 3600.0, 100)
        got = yield defer.ensureDeferred(self.run_many(T0, [hour], 101))
        self.assertEqual(sum(d.allowed for d in got), 100)
        self.assertAlmostEqual(got[-1].retry_after, 36.0, places=6)
        self.assertAlmostEqual(got[-1].reset_after, 3600.0, places=6)
        d = yield self.decide(T0 + 35.9, [hour])
        self.assertFalse(d.allowed)
        d = yield self.decide(T0 + 36.0, [hour])
        self.assertTrue(d.allowed)

    @defer.inlineCallbacks
    def test_a_late_clock_loses_no_allowance(self) -> Any:
        # Two instances whose clocks differ by a second, or requests decided out of arrival order:
        # the earlier stamp takes the latest time already seen, so the limit still admits exactly 2.
        hour = rate("h", 2, 3600.0, 2)
        first = yield self.decide(T0 + 1, [hour])
        second = yield self.decide(T0, [hour])
        third = yield self.decide(T0, [hour])
        self.assertEqual([first.allowed, second.allowed, third.allowed], [True, True, False])

    @defer.inlineCallbacks
    def test_refusal_consumes_nothing_from_other_limits(self) -> Any:
        glob = rate("global_minute", 5, 60.0, 5, "*")
        ip_a, ip_b = rate("per_ip_minute", 60, 60.0, 2, "a"), rate("per_ip_minute", 60, 60.0, 2, "b")
        a = yield defer.ensureDeferred(self.run_many(T0, [glob, ip_a], 4))
        self.assertEqual([d.allowed for d in a], [True, True, False, False])
        self.assertEqual(a[2].limit, ip_a)
        b = yield defer.ensureDeferred(self.run_many(T0, [glob, ip_b], 3))
        self.assertEqual([d.allowed for d in b], [True, True, False])
        self.assertEqual(b[2].limit, ip_b)
        # The global limit had exactly 5: 2 for a, 2 for b, and the refusals took none of it.
        c = yield self.decide(T0, [glob, rate("per_ip_minute", 60, 60.0, 2, "c")])
        self.assertTrue(c.allowed)
        c = yield self.decide(T0, [glob, rate("per_ip_minute", 60, 60.0, 2, "c")])
        self.assertFalse(c.allowed)
        self.assertEqual(c.limit, glob)

    @defer.inlineCallbacks
    def test_refused_by_the_limit_that_waits_longest(self) -> Any:
        minute = rate("m", 1, 60.0, 1)
        quota = day_quota("daily_quota", "k", 1, T0, 0.0)
        yield self.decide(T0, [minute, quota])
        d = yield self.decide(T0 + 1, [minute, quota])
        self.assertFalse(d.allowed)
        self.assertEqual(d.limit, quota)
        self.assertAlmostEqual(d.retry_after, quota.reset_at - (T0 + 1), places=6)

    @defer.inlineCallbacks
    def test_daily_quota_resets_at_midnight_utc(self) -> Any:
        midnight = (T0 // DAY + 1) * DAY
        before = midnight - 10.0
        quota = day_quota("daily_quota", "key1", 3, before, 0.0)
        self.assertEqual(quota.reset_at, midnight)
        got = yield defer.ensureDeferred(self.run_many(before, [quota], 4))
        self.assertEqual([d.remaining for d in got[:3]], [2, 1, 0])
        self.assertFalse(got[3].allowed)
        self.assertAlmostEqual(got[3].retry_after, 10.0, places=6)
        still = yield self.decide(midnight - 0.001, [day_quota("daily_quota", "key1", 3, midnight - 0.001, 0.0)])
        self.assertFalse(still.allowed)
        fresh = yield self.decide(midnight, [day_quota("daily_quota", "key1", 3, midnight, 0.0)])
        self.assertTrue(fresh.allowed)
        self.assertEqual(fresh.remaining, 2)

    @defer.inlineCallbacks
    def test_daily_quota_with_another_reset_time(self) -> Any:
        midnight = (T0 // DAY + 1) * DAY
        offset = 7.5 * 3600  # 07:30 UTC
        at = midnight + 3600  # 01:00: still yesterday's quota day
        quota = day_quota("daily_quota", "key1", 1, at, offset)
        self.assertEqual(quota.reset_at, midnight + offset)
        yield self.decide(at, [quota])
        d = yield self.decide(midnight + offset - 1, [day_quota("daily_quota", "key1", 1, midnight + offset - 1, offset)])
        self.assertFalse(d.allowed)
        d = yield self.decide(midnight + offset, [day_quota("daily_quota", "key1", 1, midnight + offset, offset)])
        self.assertTrue(d.allowed)

    @defer.inlineCallbacks
    def test_auto_block_trips_above_threshold(self) -> Any:
        probe = AutoBlockProbe("10.0.0.9", rate("auto_block", 5, 60.0, 5, "10.0.0.9"), 3600.0)
        limits = [rate("per_ip_minute", 2, 60.0, 2, "10.0.0.9")]
        got = yield defer.ensureDeferred(self._probe_many(T0, limits, probe, 6))
        # Refused requests count too: 2 admitted, 3 refused by per_ip, then the 6th blocks.
        self.assertEqual([d.allowed for d in got], [True, True, False, False, False, False])
        self.assertEqual([d.blocked_until for d in got[:5]], [None] * 5)
        self.assertEqual(got[5].blocked_until, T0 + 3600.0)
        self.assertTrue(got[5].new_block)

    @defer.inlineCallbacks
    def test_auto_block_threshold_is_exact_in_any_minute(self) -> Any:
        # More than 3 in any 60 s blocks, and nothing less: no burst allowance on top.
        def probe(ip: str) -> AutoBlockProbe:
            return AutoBlockProbe(ip, rate("auto_block", 3, 60.0, 3, ip), 600.0)

        got = []
        for t in (0.0, 20.0, 40.0, 60.0, 81.0):  # never 4 within 60 s (0 has left the window at 60)
            d = yield self.decide(T0 + t, [], probe("10.0.1.1"), "10.0.1.1")
            got.append(d.blocked_until)
        self.assertEqual(got, [None] * 5)
        d = yield self.decide(T0 + 99.0, [], probe("10.0.1.1"), "10.0.1.1")  # 40, 60, 81, 99: 4 within 59 s
        self.assertEqual(d.blocked_until, T0 + 99.0 + 600.0)
        # Three at once, then the fourth half a minute later blocks (a rate would have refilled by then).
        for _ in range(3):
            d = yield self.decide(T0 + 100.0, [], probe("10.0.1.2"), "10.0.1.2")
            self.assertIsNone(d.blocked_until)
        d = yield self.decide(T0 + 130.0, [], probe("10.0.1.2"), "10.0.1.2")
        self.assertEqual(d.blocked_until, T0 + 730.0)

    async def _probe_many(self, now: float, limits: list[Limit], probe: AutoBlockProbe, n: int) -> list[Decision]:
        return [await self.decide(now, limits, probe, probe.ip) for _ in range(n)]

    def test_default_burst_and_hour_burst(self) -> None:
        self.assertEqual(default_burst(60), 6)
        self.assertEqual(default_burst(5), 1)
        minute, hour = window_rates("per_ip", "x", WindowLimits(60, 1000, 10))
        assert isinstance(minute, Rate) and isinstance(hour, Rate)
        self.assertEqual((minute.burst, hour.burst), (10, 69))


class MemoryStoreTests(_StoreTests, unittest.TestCase):
    def setUp(self) -> None:
        self.store = MemoryStore(100_000)

    def decide(self, now: float, limits: list[Limit], probe: AutoBlockProbe | None = None,
               ip: str = "") -> defer.Deferred[Decision]:
        return defer.succeed(self.store.decide(now, limits, probe))

    def tokens(self, now: float, budgets: list[Limit], charge: int = 0) -> defer.Deferred[Decision]:
        return defer.succeed(self.store.tokens(now, budgets, charge))

    def test_table_is_bounded(self) -> None:
        store = MemoryStore(1000)
        for i in range(50_000):
            store.decide(T0, [rate("per_ip_minute", 60, 60.0, 10, f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}")])
        self.assertEqual(len(store), 1000)
        self.assertEqual(store.evicted, 49_000)

    def test_idle_entries_are_swept(self) -> None:
        store = MemoryStore(100_000)
        for i in range(500):
            store.decide(T0, [rate("per_ip_minute", 60, 60.0, 10, f"ip{i}")])
        self.assertEqual(len(store), 500)
        # A minute later every bucket is full again: ordinary traffic sweeps the spent entries.
        for _ in range(300):
            store.decide(T0 + 60, [rate("per_ip_minute", 60, 60.0, 10, "busy")])
        self.assertEqual(len(store), 1)


class _RedisFixture(ClassRedis):
    """One redis-server for the class, flushed before each test, and a store connected to it."""

    def setUp(self) -> None:
        super().setUp()
        self.store = RedisStore(RedisState(port=self.server.port, timeout=2.0), real_reactor)
        self.store.connect()

    def tearDown(self) -> Any:
        return self.store.stop()


class RedisStoreTests(_RedisFixture, _StoreTests, unittest.TestCase):

    def decide(self, now: float, limits: list[Limit], probe: AutoBlockProbe | None = None,
               ip: str = "") -> defer.Deferred[Decision]:
        return defer.ensureDeferred(self.store.decide(now, limits, probe, ip))

    def tokens(self, now: float, budgets: list[Limit], charge: int = 0) -> defer.Deferred[Decision]:
        return defer.ensureDeferred(self.store.tokens(now, budgets, charge))

    @defer.inlineCallbacks
    def test_token_budgets_agree_with_memory_and_are_shared_by_instances(self) -> Any:
        rng = random.Random(11)
        memory = MemoryStore(100_000)
        other = RedisStore(RedisState(port=self.server.port, timeout=2.0), real_reactor)
        other.connect()
        try:
            now = T0
            for i in range(300):
                now += rng.choice((0.0, 0.05, 0.5, 2.0))
                budgets: list[Limit] = [Rate("tokens_per_minute", "t:5000:default:k", 5000, 60.0, 5000),
                                        day_quota("daily_token_quota", "tokens:k", 200_000, now, 0.0)]
                charge = rng.choice((0, 0, 37, 400, 2500))
                want = memory.tokens(now, budgets, charge)
                # Two instances take turns: what one charges, the other sees.
                store = self.store if i % 2 else other
                got = yield defer.ensureDeferred(store.tokens(now, budgets, charge))
                self.assertEqual((got.allowed, got.limit, got.remaining), (want.allowed, want.limit, want.remaining))
                self.assertAlmostEqual(got.retry_after, want.retry_after, places=6)
        finally:
            yield other.stop()

    @defer.inlineCallbacks
    def test_same_decisions_as_memory(self) -> Any:
        """Random traffic over several limits: both backends agree on every number."""
        rng = random.Random(7)
        memory = MemoryStore(100_000)
        now = T0
        for _ in range(400):
            now += rng.choice((0.0, 0.0, 0.013, 0.1, 0.7, 3.0))
            ip = rng.choice("abc")
            limits: list[Limit] = [
                rate("global_minute", 7, 60.0, 3, "*"),
                rate("per_ip_minute", 3, 60.0, 2, ip),
                rate("global_hour", 50, 3600.0, 9, "*"),
                day_quota("daily_quota", ip, 40, now, 0.0),
            ]
            want = memory.decide(now, limits)
            got = yield self.decide(now, limits)
            self.assertEqual((got.allowed, got.limit, got.remaining), (want.allowed, want.limit, want.remaining))
            self.assertEqual((got.retry_after, got.reset_after), (want.retry_after, want.reset_after))

    @defer.inlineCallbacks
    def test_a_block_made_by_one_instance_holds_on_another(self) -> Any:
        probe = AutoBlockProbe("10.0.0.7", rate("auto_block", 1, 60.0, 1, "10.0.0.7"), 600.0)
        yield self.decide(T0, [], probe, probe.ip)
        made = yield self.decide(T0, [], probe, probe.ip)
        self.assertTrue(made.new_block)
        other = RedisStore(RedisState(port=self.server.port, timeout=2.0), real_reactor)
        other.connect()
        try:
            seen = yield defer.ensureDeferred(other.decide(T0 + 1, [rate("m", 100, 60.0, 100)], None, "10.0.0.7"))
            self.assertFalse(seen.allowed)
            self.assertFalse(seen.new_block)
            self.assertEqual(seen.blocked_until, T0 + 600.0)
            blocks = yield defer.ensureDeferred(other.active_blocks(T0 + 1))
            self.assertEqual(blocks, [("10.0.0.7", T0 + 600.0)])
            gone = yield defer.ensureDeferred(other.active_blocks(T0 + 600.0))
            self.assertEqual(gone, [])
            made = yield defer.ensureDeferred(other.blocks_made_since(T0 - 10))
            self.assertEqual([(ip, until) for ip, until, _ in made], [("10.0.0.7", T0 + 600.0)])
            self.assertAlmostEqual(made[0][2], T0, delta=1.0)
            none = yield defer.ensureDeferred(other.blocks_made_since(T0 + 1))
            self.assertEqual(none, [])
        finally:
            yield other.stop()

    @defer.inlineCallbacks
    def test_quota_key_is_per_day(self) -> Any:
        """A day's count lives under that day's key until its last moment; the next day counts afresh
        under a key of its own, and the spent day's count is left as it was."""
        today: Quota = day_quota("daily_quota", "k", 2, T0, 0.0)
        last_moment = today.reset_at - 0.001
        same_day = day_quota("daily_quota", "k", 2, last_moment, 0.0)
        tomorrow = day_quota("daily_quota", "k", 2, today.reset_at, 0.0)
        self.assertEqual(same_day.key, today.key)
        self.assertNotEqual(tomorrow.key, today.key)
        got = yield defer.ensureDeferred(self.run_many(T0, [today], 2))
        self.assertEqual([d.remaining for d in got], [1, 0])
        spent = yield self.decide(last_moment, [same_day])
        self.assertFalse(spent.allowed)
        fresh = yield self.decide(today.reset_at, [tomorrow])
        self.assertEqual((fresh.allowed, fresh.remaining), (True, 1))
        # The raw replies: a bulk string "2" for the spent day, "1" for the new one (a missing key
        # would answer $-1).
        self.assertEqual(self.server.command("GET", "ccproxy:rl:" + today.key), b"$1\r\n2\r\n")
        self.assertEqual(self.server.command("GET", "ccproxy:rl:" + tomorrow.key), b"$1\r\n1\r\n")

    @defer.inlineCallbacks
    def test_a_pool_that_gave_up_is_replaced(self) -> Any:
        """txredisapi stops reconnecting if a connection drops mid-handshake; the store starts afresh."""
        from ccproxy.limits._redis import RedisUnavailable

        yield self.decide(T0, [rate("m", 10, 60.0, 10)])
        factory = self.store._pool._factory
        yield factory.disconnect()
        with self.assertRaises(RedisUnavailable):
            yield self.decide(T0, [rate("m", 10, 60.0, 10)])
        self.assertIsNot(self.store._pool._factory, factory)
        d = yield self.decide(T0, [rate("m", 10, 60.0, 10)])
        self.assertEqual(d.remaining, 8)


def test_planner_matches_limits_for() -> None:
    """The cached plan is exactly the plain one, for every kind of caller and across a day's end."""
    from ccproxy.context import Identity
    from ccproxy.limits._plan import Planner, limits_for, probe_for
    from tests.support.limits import limits_config

    config = limits_config({"global": {"requests_per_minute": 100, "requests_per_hour": 1000},
                            "per_ip": {"requests_per_minute": 10},
                            "per_key": {"default": {"requests_per_minute": 50, "daily_quota": 100}}},
                           {"enabled": True, "threshold": 20, "duration": "1m"})
    planner = Planner(config)
    midnight = (T0 // DAY + 1) * DAY
    for now in (midnight - 1, midnight - 1, midnight, midnight + 5):
        for ip in ("10.0.0.1", "10.0.0.2"):
            for identity in (None, Identity("k1"), Identity("k1", rate_limit=5), Identity("k2", tier="x")):
                assert planner.plan(ip, identity, now) == (limits_for(config, ip, identity, now), probe_for(config, ip))


class RedisBatchTests(_RedisFixture, unittest.TestCase):
    """Concurrent decisions share script calls; each is still decided alone, in order."""

    @defer.inlineCallbacks
    def test_concurrent_decisions_match_sequential_ones(self) -> Any:
        memory = MemoryStore(100_000)
        # Load the script first: batches that both meet NOSCRIPT may run in either order.
        yield defer.ensureDeferred(self.store.decide(T0, [rate("warm-up", 1, 60.0, 1)]))
        calls: list[int] = []
        evalsha = self.store._pool.evalsha

        def counting(sha: str, keys: list[str], args: list[str]) -> Any:
            calls.append(args[0].count(";") + 1)
            return evalsha(sha, keys, args)

        self.store._pool.evalsha = counting
        requests = []
        for i in range(150):  # more than one batch
            ip = f"10.0.0.{i % 3}"
            limits: list[Limit] = [rate("global_minute", 100, 60.0, 100, "*"), rate("per_ip_minute", 60, 60.0, 40, ip)]
            probe = AutoBlockProbe(ip, rate("auto_block", 60, 60.0, 60, ip), 60.0) if i % 3 == 2 else None
            requests.append((limits, probe, ip))
        want = [memory.decide(T0, limits, probe) for limits, probe, _ in requests]
        got = yield defer.gatherResults([defer.ensureDeferred(self.store.decide(T0, limits, probe, ip))
                                         for limits, probe, ip in requests])
        self.assertEqual([(d.allowed, d.limit, d.remaining, d.blocked_until) for d in got],
                         [(d.allowed, d.limit, d.remaining, d.blocked_until) for d in want])
        self.assertEqual(sum(d.allowed for d in got), 100)
        self.assertEqual(calls, [64, 64, 22])


def test_a_charge_alone_leaves_the_budgets_as_a_charge_that_also_asks() -> None:
    """`MemoryStore.charge` (a finished request's usage, nobody waiting) changes the budgets
    exactly as `tokens` with a charge does."""
    budgets = [Rate("tokens_per_minute", "t:1000:default:k", 1000, 60.0, 1000),
               Quota("daily_token_quota", "tokens:k:1", 1500, T0 + 3600)]
    charged, asked = MemoryStore(100), MemoryStore(100)
    for at, tokens in [(0.0, 400), (1.0, 700), (1.5, 0), (30.0, 300), (30.0, 1), (90.0, 200)]:
        if tokens:
            charged.charge(T0 + at, budgets, tokens)
            asked.tokens(T0 + at, budgets, tokens)
        assert charged.tokens(T0 + at, budgets) == asked.tokens(T0 + at, budgets)
    assert not charged.tokens(T0 + 90.0, budgets).allowed  # the day's 1,500 are spent
