"""One timer with a purpose: armed, pushed back, cancelled, and told when it fires.

Connections, requests and relays each keep a deadline (header, body, idle, send, linger); this is
the one way they do it, with the clock they were given.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime

T = TypeVar("T")


class Deadline:
    """Calls `fire` once the time armed for has passed, unless cancelled or armed again first."""

    __slots__ = ("_call", "clock", "fire")

    def __init__(self, clock: IReactorTime, fire: Callable[[], object]) -> None:
        self.clock = clock
        self.fire = fire
        self._call: IDelayedCall | None = None

    @property
    def armed(self) -> bool:
        return self._call is not None and self._call.active()

    def arm(self, seconds: float | None) -> None:
        """Fire `seconds` from now (replacing any earlier arming); None means no deadline."""
        if seconds is None:
            self.cancel()
        elif self._call is not None and self._call.active():
            self._call.reset(seconds)  # moving a live timer costs less than a new one
        else:
            self._call = self.clock.callLater(seconds, self._fired)

    def cancel(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _fired(self) -> None:
        self._call = None
        self.fire()


class TimedOut(Exception):
    """The awaited work was cancelled because its time ran out."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"no result within {seconds:g}s")
        self.seconds = seconds


async def within(clock: IReactorTime, seconds: float, d: Deferred[T]) -> T:
    """The result of `d`, cancelled and raised as TimedOut once `seconds` have passed.

    Not Deferred.addTimeout: a cancelled request may fail with an error other than CancelledError
    (a connection lost, a protocol error), and the caller must still be told it was the time.
    """
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        d.cancel()

    deadline = Deadline(clock, expire)
    deadline.arm(seconds)
    try:
        return await d
    except Exception as e:
        if expired:
            raise TimedOut(seconds) from e
        raise
    finally:
        deadline.cancel()
