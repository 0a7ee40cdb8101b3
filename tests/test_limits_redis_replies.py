"""RedisStore against a stand-in for the txredisapi pool, on a task.Clock: replies of an unexpected shape,
no answer, a failing connection, batching bounds and stopping. Each becomes RedisUnavailable (the
on_error policy then applies), promptly and once per request; none hangs a request or escapes."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from twisted.internet import defer, task

from ccproxy.config.limits import RedisState
from ccproxy.limits._core import Quota, Rate
from ccproxy.limits._redis import BLOCKS, BLOCKS_MADE, LIFTED, MAX_BATCH, PREFIX, RedisStore, RedisUnavailable

TIMEOUT = 0.05
RATE = Rate("per_ip_minute", "ip:192.0.2.1:m", 60, 60.0, 10)
QUOTA = Quota("per_ip_day", "ip:192.0.2.1:d0", 1000, 86400.0)
HANG = object()  # a command Redis never answers


class ScriptDoesNotExist(Exception):
    """What txredisapi raises on NOSCRIPT (matched by name, as the store does)."""


class FakePool:
    """The txredisapi pool's calls the store makes; `answer` decides each script call's outcome."""

    def __init__(self, answer: Callable[[list[str], list[str]], Any]) -> None:
        self.answer = answer
        self.scripts: list[tuple[str, list[str], list[str]]] = []
        self.commands: list[tuple[Any, ...]] = []
        self.replies: dict[str, Any] = {}
        self.disconnected = False
        self._factory = SimpleNamespace(stopped=False, disconnectCalled=False)

    def evalsha(self, sha: str, keys: list[str], args: list[str]) -> Any:
        self.scripts.append(("evalsha", keys, args))
        return self.answer(keys, args)

    def eval(self, script: bytes, keys: list[str], args: list[str]) -> Any:
        self.scripts.append(("eval", keys, args))
        return self.answer(keys, args)

    def _command(self, *call: Any) -> defer.Deferred[Any]:
        self.commands.append(call)
        value = self.replies.get(call[0])
        if value is HANG:
            return defer.Deferred()
        return defer.fail(value) if isinstance(value, Exception) else defer.succeed(value)

    def zrangebyscore(self, key: str, low: str, high: str, withscores: bool = False) -> defer.Deferred[Any]:
        return self._command("zrangebyscore", key, low, high)

    def delete(self, key: str) -> defer.Deferred[Any]:
        return self._command("delete", key)

    def zrem(self, key: str, member: str) -> defer.Deferred[Any]:
        return self._command("zrem", key, member)

    def zadd(self, key: str, score: float, member: str) -> defer.Deferred[Any]:
        return self._command("zadd", key, score, member)

    def set(self, key: str, value: str, pexpire: int | None = None) -> defer.Deferred[Any]:
        return self._command("set", key, value, pexpire)

    def get(self, key: str) -> defer.Deferred[Any]:
        return self._command("get", key)

    def disconnect(self) -> defer.Deferred[None]:
        self.disconnected = True
        return defer.succeed(None)


def store(answer: Callable[[list[str], list[str]], Any]) -> tuple[RedisStore, FakePool, task.Clock]:
    clock = task.Clock()
    s = RedisStore(RedisState(timeout=TIMEOUT), clock)
    pool = FakePool(answer)
    s._pool = pool
    return s, pool, clock


def outcome(d: defer.Deferred[Any]) -> Any:
    """The result of a fired Deferred, or the exception it failed with."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "still waiting"
    value = results[0]
    return value.value if hasattr(value, "value") and isinstance(value.value, Exception) else value


def decide(s: RedisStore, now: float = 1000.0) -> defer.Deferred[Any]:
    return defer.ensureDeferred(s.decide(now, [RATE, QUOTA], ip="192.0.2.1"))


def answers(*per_request: str) -> Callable[[list[str], list[str]], Any]:
    return lambda keys, args: defer.succeed(";".join(per_request))


def test_one_turns_requests_share_one_call_and_each_gets_its_own_answer() -> None:
    s, pool, clock = store(lambda keys, args: defer.succeed(";".join(
        "1 1 9 1 0 1 999 86000 0" if i == 0 else "2 1300.5" for i in range(len(args[0].split(";"))))))
    first, second = decide(s), decide(s)
    assert pool.scripts == []  # sent at the end of this reactor turn
    clock.advance(0)
    assert len(pool.scripts) == 1
    admitted, blocked = outcome(first), outcome(second)
    assert admitted.allowed and admitted.remaining == 9
    assert not blocked.allowed and blocked.blocked_until == 1300.5 and blocked.retry_after == 300.5


def test_more_than_a_batch_in_one_turn_makes_several_calls() -> None:
    s, pool, clock = store(lambda keys, args: defer.succeed(";".join(["1 1 9 1 0 1 999 86000 0"] * len(
        args[0].split(";")))))
    waiting = [decide(s) for _ in range(MAX_BATCH + 1)]
    assert len(pool.scripts) == 1 and len(pool.scripts[0][2][0].split(";")) == MAX_BATCH  # full: sent at once
    clock.advance(0)
    assert len(pool.scripts) == 2 and all(outcome(d).allowed for d in waiting)


@pytest.mark.parametrize("reply", ["garbage", "1 1 9", "", b"7 x"])
def test_an_answer_of_an_unexpected_shape_is_an_outage(reply: Any) -> None:
    s, _, clock = store(answers(reply) if isinstance(reply, str) else lambda k, a: defer.succeed(reply))
    d = decide(s)
    clock.advance(0)
    error = outcome(d)
    assert isinstance(error, RedisUnavailable) and str(error).startswith("unexpected reply from the script: ")


@pytest.mark.parametrize("count", [1, 3])
def test_a_reply_with_too_few_or_too_many_answers_fails_every_request_at_once(count: int) -> None:
    # Another program's script under our name, or a proxy in between: not one answer per request.
    s, _, clock = store(lambda keys, args: defer.succeed(";".join(["1 1 9 1 0 1 999 86000 0"] * count)))
    waiting = [decide(s), decide(s)]
    clock.advance(0)
    errors = [outcome(d) for d in waiting]  # at once: no request waits for its timeout
    assert all(isinstance(e, RedisUnavailable) and "unexpected reply" in str(e) for e in errors), errors


def test_no_answer_within_the_timeout() -> None:
    s, _, clock = store(lambda keys, args: defer.Deferred())
    d = decide(s)
    clock.advance(0)
    clock.advance(TIMEOUT)
    error = outcome(d)
    assert isinstance(error, RedisUnavailable) and str(error) == "no answer within 50 ms"
    assert clock.getDelayedCalls() == []


def test_a_failing_connection_fails_the_batch_with_its_reason() -> None:
    s, _, clock = store(lambda keys, args: defer.fail(ConnectionError("Not connected")))
    waiting = [decide(s), decide(s)]
    clock.advance(0)
    assert [str(outcome(d)) for d in waiting] == ["ConnectionError: Not connected"] * 2


def test_a_script_redis_does_not_know_is_sent_whole() -> None:
    def answer(keys: list[str], args: list[str]) -> Any:
        if pool.scripts[-1][0] == "evalsha":  # Redis restarted: its script cache is empty
            raise ScriptDoesNotExist("NOSCRIPT")
        return defer.succeed("1 1 9 1 0 1 999 86000 0")

    s, pool, clock = store(answer)
    d = decide(s)
    clock.advance(0)
    assert outcome(d).allowed and [kind for kind, _, _ in pool.scripts] == ["evalsha", "eval"]


def test_without_a_connection_every_call_says_so() -> None:
    s = RedisStore(RedisState(timeout=TIMEOUT), task.Clock())
    for call in (s.decide(1.0, [RATE]), s.tokens(1.0, [RATE]), s.active_blocks(1.0), s.blocks_made_since(1.0),
                 s.share_block("192.0.2.1", None, 1.0), s.get_shared("emergency"), s.set_shared("emergency", "1")):
        error = outcome(defer.ensureDeferred(call))
        assert isinstance(error, RedisUnavailable) and str(error) == "not connected"
    assert s.stop() is None


def test_token_budgets_charge_and_read_their_answer() -> None:
    s, pool, _ = store(lambda keys, args: defer.succeed(b"1 1 50 3600 0"))
    decision = outcome(defer.ensureDeferred(s.tokens(1000.0, [RATE], charge=7)))
    assert decision.allowed and decision.remaining == 50
    _, keys, args = pool.scripts[0]
    assert keys == [PREFIX + RATE.key, PREFIX + "clock"] and args[:2] == ["1000.0", "7"]


@pytest.mark.parametrize(("answer", "message"), [
    (lambda k, a: defer.succeed("ERR"), "unexpected reply from the token script: 'ERR'"),
    (lambda k, a: defer.fail(ConnectionError("lost")), "ConnectionError: lost"),
    (lambda k, a: defer.Deferred(), "no answer within 50 ms"),
])
def test_token_budget_failures_are_outages(answer: Any, message: str) -> None:
    s, _, clock = store(answer)
    d = defer.ensureDeferred(s.tokens(1000.0, [QUOTA], charge=1))
    clock.advance(TIMEOUT)
    error = outcome(d)
    assert isinstance(error, RedisUnavailable) and str(error) == message


def test_blocks_are_shared_and_lifted_through_redis() -> None:
    s, pool, _ = store(answers())
    outcome(defer.ensureDeferred(s.share_block("192.0.2.9", 1060.0, 1000.0)))
    outcome(defer.ensureDeferred(s.share_block("198.51.100.0/24", 1e12, 1000.0)))
    outcome(defer.ensureDeferred(s.share_block("192.0.2.9", None, 1100.0)))
    forever = 1000.0 + 10 * 365 * 86400.0
    assert pool.commands == [
        ("set", PREFIX + "block:192.0.2.9", "1060.0", 60000),  # refused by the script on every instance
        ("zadd", BLOCKS, 1060.0, "192.0.2.9"),
        ("zadd", BLOCKS_MADE, 1000.0, "192.0.2.9 1060.0"),
        ("zadd", BLOCKS, forever, "198.51.100.0/24"),  # a range: refused at accept, by the polls
        ("zadd", BLOCKS_MADE, 1000.0, f"198.51.100.0/24 {forever!r}"),
        ("delete", PREFIX + "block:192.0.2.9"),
        ("zrem", BLOCKS, "192.0.2.9"),
        ("zadd", BLOCKS_MADE, 1100.0, f"192.0.2.9 {LIFTED}"),
    ]


def test_polls_and_shared_values_read_what_redis_holds() -> None:
    s, pool, _ = store(answers())
    pool.replies = {"zrangebyscore": [(b"192.0.2.9", 1060.0)], "get": b"on"}
    assert outcome(defer.ensureDeferred(s.active_blocks(1000.0))) == [("192.0.2.9", 1060.0)]
    pool.replies["zrangebyscore"] = [(b"192.0.2.9 1060.0", 1000.0), ("2001:db8::1 0.0", 1001.0)]
    assert outcome(defer.ensureDeferred(s.blocks_made_since(990.0))) == [("192.0.2.9", 1060.0, 1000.0),
                                                                          ("2001:db8::1", 0.0, 1001.0)]
    assert outcome(defer.ensureDeferred(s.get_shared("emergency"))) == "on"
    pool.replies["get"] = None
    assert outcome(defer.ensureDeferred(s.get_shared("emergency"))) is None
    pool.replies["set"] = ConnectionError("gone")
    error = outcome(defer.ensureDeferred(s.set_shared("emergency", "off")))
    assert isinstance(error, RedisUnavailable) and str(error) == "ConnectionError: gone"


def test_a_poll_redis_never_answers_gives_up_after_the_timeout() -> None:
    s, pool, clock = store(answers())
    pool.replies["zrangebyscore"] = HANG
    d = defer.ensureDeferred(s.active_blocks(1000.0))
    clock.advance(TIMEOUT)
    error = outcome(d)
    assert isinstance(error, RedisUnavailable) and str(error) == "no answer within 50 ms"


def test_stop_fails_what_waits_and_disconnects() -> None:
    s, pool, clock = store(answers("1 1 9 1 0 1 999 86000 0"))
    d = decide(s)
    d.addErrback(lambda f: f)  # the outcome below reads it
    s.stop()
    error = outcome(d)
    assert isinstance(error, RedisUnavailable) and str(error) == "stopped"
    assert pool.disconnected and pool.scripts == [] and clock.getDelayedCalls() == []


def test_a_poll_that_crossed_a_lifting_does_not_bring_the_block_back() -> None:
    from ccproxy.blocklist import BlockList
    from ccproxy.config.limits import REDIS, StateConfig
    from ccproxy.limits._layer import Limiter
    from ccproxy.runtime import Deps

    reactor = task.Clock()
    reactor.advance(1000.0)
    blocklist = BlockList()
    limiter = Limiter(StateConfig(backend=REDIS), Deps(reactor=reactor, blocklist=blocklist))
    pool = FakePool(answers())
    assert isinstance(limiter.store, RedisStore)
    limiter.store._pool = pool
    limiter.block("192.0.2.9", 1600.0, new=True)
    limiter.synced_at = 995.0
    limiter.lift("192.0.2.9")  # an operator's unblock, while its lifting marker is still on its way to Redis
    assert not blocklist.is_blocked("192.0.2.9", 1000.0)
    # The poll reads the block as made (it was, at 990) but not yet its lifting.
    pool.replies["zrangebyscore"] = [(b"192.0.2.9 1600.0", 990.0)]
    outcome(defer.ensureDeferred(limiter.sync_blocks(1000.0)))
    assert not blocklist.is_blocked("192.0.2.9", 1000.5)
    # A block made after the lifting is news, and applies.
    reactor.advance(1.0)
    pool.replies["zrangebyscore"] = [(b"192.0.2.9 1600.0", 990.0), (b"192.0.2.9 1700.0", 1001.0)]
    outcome(defer.ensureDeferred(limiter.sync_blocks(1001.0)))
    assert blocklist.is_blocked("192.0.2.9", 1001.5)
