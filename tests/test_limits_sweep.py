"""The memory store's amortised sweep and the one-pass `combine`: the table stays bounded between
sweeps, spent entries still go while traffic flows, and `combine` answers as the plain reading of
its rule (max of refusals' waits, else min of (remaining, -reset_after), first on ties)."""

from __future__ import annotations

import random

from twisted.trial import unittest

from ccproxy.limits._core import Decision, Limit, Outcome, Quota, Rate, combine
from ccproxy.limits._memory import MemoryStore
from ccproxy.limits._plan import AutoBlockProbe
from tests.support.limits import T0


def _rate(subject: str) -> Rate:
    return Rate("per_ip_minute", f"m:{subject}", 60, 60.0, 10)


class AmortisedSweepTests(unittest.TestCase):

    def test_table_never_passes_max_entries_between_sweeps(self) -> None:
        store = MemoryStore(100)
        for i in range(1000):
            # Two fresh keys a decision: the sweep (every 16th decision) finds nothing spent.
            store.decide(T0, [_rate(f"a{i}"), _rate(f"b{i}")])
            self.assertLessEqual(len(store), 100)
        self.assertEqual(len(store), 100)
        self.assertEqual(store.evicted, 1900)

    def test_probe_logs_never_pass_max_entries(self) -> None:
        store = MemoryStore(50)
        for i in range(500):
            store.decide(T0, [], AutoBlockProbe(f"10.0.{i >> 8}.{i & 255}", Rate("auto_block", f"b:{i}", 100, 60.0, 100), 300.0))
            self.assertLessEqual(store.watched(), 50)
        self.assertEqual(store.watched(), 50)

    def test_spent_entries_go_within_sixteen_decisions_per_thirty_two(self) -> None:
        store = MemoryStore(100_000)
        for i in range(64):
            store.decide(T0, [_rate(f"ip{i}")])
        self.assertEqual(len(store), 64)
        # A minute later all 64 are spent; 32 decisions are two sweeps of 32 entries each.
        for _ in range(32):
            store.decide(T0 + 60, [_rate("busy")])
        self.assertEqual(len(store), 1)

    def test_live_entries_survive_the_sweep(self) -> None:
        store = MemoryStore(100_000)
        limits = [_rate(f"ip{i}") for i in range(40)]
        store.decide(T0, limits)
        for _ in range(64):
            store.decide(T0 + 0.5, [_rate("busy")])
        self.assertEqual(len(store), 41)
        # Their state was kept: the bucket has 8 of its 10 left after a second request half a second on.
        self.assertEqual(store.decide(T0 + 0.5, limits[:1]).remaining, 8)


def _reference(limits: list[Limit], outcomes: list[Outcome]) -> Decision:
    refused = [i for i, o in enumerate(outcomes) if not o.allowed]
    if refused:
        i = max(refused, key=lambda j: outcomes[j].retry_after)
        return Decision(False, limits[i], 0, outcomes[i].reset_after, outcomes[i].retry_after)
    if not limits:
        return Decision(True)
    i = min(range(len(limits)), key=lambda j: (outcomes[j].remaining, -outcomes[j].reset_after))
    return Decision(True, limits[i], outcomes[i].remaining, outcomes[i].reset_after, 0.0)


class CombineTests(unittest.TestCase):

    def test_agrees_with_the_rule_on_random_outcomes_with_ties(self) -> None:
        rng = random.Random(7)
        for _ in range(5000):
            n = rng.randrange(0, 6)
            limits: list[Limit] = [Quota(f"q{i}", f"k{i}", 10, T0) for i in range(n)]
            # Few distinct values, so ties on every field are common.
            outcomes = [Outcome(rng.random() < 0.7, rng.randrange(3), float(rng.randrange(3)),
                                float(rng.randrange(3)), 0.0) for _ in range(n)]
            got, want = combine(limits, outcomes), _reference(limits, outcomes)
            self.assertEqual(got, want)
            self.assertIs(got.limit, want.limit)

    def test_refusal_wins_over_any_admission_after_it(self) -> None:
        limits: list[Limit] = [Quota("a", "a", 1, T0), Quota("b", "b", 1, T0), Quota("c", "c", 1, T0)]
        outcomes = [Outcome(True, 0, 9.0, 0.0, 0.0), Outcome(False, 0, 1.0, 2.0, 0.0),
                    Outcome(False, 0, 1.0, 2.0, 0.0)]
        decision = combine(limits, outcomes)
        self.assertFalse(decision.allowed)
        self.assertIs(decision.limit, limits[1])
        self.assertEqual(decision.retry_after, 2.0)
