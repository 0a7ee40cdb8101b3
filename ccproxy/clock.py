"""The timers of one component, owned in one place.

A component (a limiter, a cache that refreshes itself) makes every delayed and looping call through
its own `Clock`; stopping the component calls `shutdown`, which cancels them all, so nothing it set
fires after it is gone (after a reload that replaced it, say). One-shot calls may still be made
after: work already under way when the component stopped must stay bounded in time (a Redis call's
timeout); a looping call may not. The Clock is itself an IReactorTime:
hand it to anything that takes a clock (Deferred.addTimeout, LoopingCall, a store) and their timers
are owned too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import task
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

log = Logger()

# Calls cancelled by their owner stay in the table until it is swept; sweep when it has grown this much.
_SWEEP_AT = 64


@implementer(IReactorTime)
class Clock:
    def __init__(self, reactor: IReactorTime) -> None:
        self.reactor = reactor
        self._delayed: set[IDelayedCall] = set()
        self._looping: set[task.LoopingCall] = set()
        self._sweep_at = _SWEEP_AT
        self.stopped = False

    def seconds(self) -> float:
        return self.reactor.seconds()

    def callLater(self, delay: float, callable: Callable[..., Any], *args: Any, **kw: Any) -> IDelayedCall:
        def run() -> None:
            self._delayed.discard(call)
            callable(*args, **kw)

        call = self.reactor.callLater(delay, run)
        self._delayed.add(call)
        if len(self._delayed) >= self._sweep_at:
            self._delayed = {c for c in self._delayed if c.active()}
            self._sweep_at = max(_SWEEP_AT, 2 * len(self._delayed))
        return call

    def getDelayedCalls(self) -> list[IDelayedCall]:
        return [c for c in self._delayed if c.active()]

    def looping_call(self, f: Callable[[], object], interval: float, what: str, now: bool = False) -> task.LoopingCall:
        """Call `f` every `interval` seconds until stopped or shut down; a failure stops it, logged
        as `what` stopped."""
        if self.stopped:
            raise RuntimeError(f"{what}: a looping call on a clock that was shut down")
        loop = task.LoopingCall(f)
        loop.clock = self
        self._looping.add(loop)
        done = loop.start(interval, now=now)
        done.addErrback(lambda failure: log.failure("{what} stopped", failure, what=what))
        done.addBoth(lambda _: self._looping.discard(loop))
        return loop

    def shutdown(self) -> None:
        """Stop every looping call and cancel every delayed call made so far."""
        self.stopped = True
        for loop in list(self._looping):
            if loop.running:
                loop.stop()
        self._looping.clear()
        for call in self._delayed:
            if call.active():
                call.cancel()
        self._delayed.clear()
