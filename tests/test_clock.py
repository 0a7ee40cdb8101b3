"""A component's timers owned by its own Clock: stopping the component cancels every one."""

from __future__ import annotations

import pytest
from twisted.internet import defer, task

from ccproxy.blocklist import BlockList
from ccproxy.clock import Clock
from ccproxy.limits._layer import Limiter, LimitsLayer, build
from ccproxy.runtime import Deps
from tests.support.limits import limits_config


def test_shutdown_cancels_every_delayed_and_looping_call_made_through_the_clock() -> None:
    reactor = task.Clock()
    clock = Clock(reactor)
    fired: list[str] = []
    clock.callLater(5, fired.append, "once")
    ticks = clock.looping_call(lambda: fired.append("tick"), 2, "test ticks")
    # Anything that takes a clock owns its timers through this one, Deferred timeouts included.
    slow: defer.Deferred[None] = defer.Deferred()
    slow.addTimeout(30, clock)
    slow.addErrback(lambda f: fired.append(f.type.__name__))
    reactor.pump([2, 2])
    assert fired == ["tick", "tick"] and clock.seconds() == 4
    clock.shutdown()
    assert not ticks.running and reactor.getDelayedCalls() == [] and clock.getDelayedCalls() == []
    reactor.advance(100)
    assert fired == ["tick", "tick"]  # nothing set before the shutdown fires after it
    with pytest.raises(RuntimeError):
        clock.looping_call(lambda: None, 1, "too late")
    # A one-shot may still be set: work under way when its owner stopped stays bounded in time.
    clock.callLater(1, fired.append, "bounded")
    reactor.advance(1)
    assert fired[-1] == "bounded"


def test_calls_that_fired_or_were_cancelled_are_not_kept() -> None:
    reactor = task.Clock()
    clock = Clock(reactor)
    for _ in range(1000):
        clock.callLater(1, lambda: None).cancel()
        clock.callLater(0, lambda: None)
        reactor.advance(0)
    assert len(clock._delayed) < 130  # swept as it grows: memory bounded by the live calls, not the history
    assert clock.getDelayedCalls() == []


def test_a_reload_that_drops_the_limiter_leaves_none_of_its_timers_behind() -> None:
    reactor = task.Clock()
    deps = Deps(reactor=reactor, blocklist=BlockList())
    on = limits_config({"enabled": True, "per_ip": {"requests_per_minute": 60}})
    Limiter(on.state, deps)
    assert reactor.getDelayedCalls() == []  # made, not started: a constructor sets no timer
    first = build(on, deps, None)
    assert first.limiter is not None and len(reactor.getDelayedCalls()) == 1  # its housekeeping
    first.limiter.clock.callLater(60, lambda: None)  # say, a store's batch flush or call timeout
    kept = build(on, deps, first)  # the same store: its timers carry on
    assert kept.limiter is first.limiter and len(reactor.getDelayedCalls()) == 2
    off = build(limits_config({"enabled": False}), deps, kept)
    assert isinstance(off, LimitsLayer) and off.limiter is None
    assert reactor.getDelayedCalls() == []
