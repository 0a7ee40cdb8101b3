"""The audit trail of a successor starts only once its predecessor has exited.

Both processes serve while the old one drains; if both wrote the audit files, each would carry on
the hash chain from where it found it and the chain would fork. So a successor keeps its events
(with the time each happened) until its predecessor, its parent process, is gone, then starts its
trail, which resumes the chain after the predecessor's last record, and writes the kept events
first, each stamped with its own time.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, task
from twisted.logger import ILogObserver, Logger, LogPublisher, globalLogPublisher
from twisted.python import threadable
from zope.interface import implementer

from ccproxy import events
from ccproxy.audit._trail import ACCESS_NAMESPACE, _AccessOnly
from ccproxy.site import ACCESS_PUBLISHER
from ccproxy.workers.activation import HANDOVER_FD_ENV

log = Logger()

POLL = 0.1
MAX_HELD = 100_000


class _Clock:
    """The reactor, except that `seconds()` can be set: kept events are sealed with their own time."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self.at: float | None = None

    def seconds(self) -> float:
        return self.at if self.at is not None else float(self._reactor.seconds())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


@implementer(ILogObserver)
class HeldAudit:
    def __init__(self, start: Callable[[Any], Any], reactor: Any, predecessor: int,
                 publisher: LogPublisher = globalLogPublisher, observe: bool = True) -> None:
        self.start_trail = start
        self.reactor = reactor
        self.predecessor = predecessor
        self.publisher = publisher
        self.observe = observe
        self.held: list[tuple[float, dict[str, Any]]] = []
        self.trail: Any = None
        self._access_only = _AccessOnly(self)  # type: ignore[arg-type]
        self._poll = task.LoopingCall(self._check)
        self._poll.clock = reactor

    def start(self) -> HeldAudit:
        if self.observe:
            events.add_observer(self)
            self.publisher.addObserver(self._access_only)
            ACCESS_PUBLISHER.addObserver(self)
        self._poll.start(POLL, now=False).addErrback(lambda f: log.failure("audit trail did not start", f))
        log.info("audit trail waits for the previous process (pid {pid}) to exit", pid=self.predecessor)
        return self

    def __call__(self, event: dict[str, Any]) -> None:
        if self.trail is not None:
            self.trail(event)
            return
        if event.get("ccproxy_event") is None and event.get("log_namespace") != ACCESS_NAMESPACE:
            return
        if threadable.ioThread is not None and not threadable.isInIOThread():
            self.reactor.callFromThread(self, event)
            return
        if len(self.held) < MAX_HELD:
            self.held.append((float(self.reactor.seconds()), dict(event)))

    def _check(self) -> None:
        if os.getppid() != self.predecessor:
            self.release()

    def release(self) -> None:
        if self.trail is not None:
            return
        if self._poll.running:
            self._poll.stop()
        if self.observe:
            self.observe = False
            events.remove_observer(self)
            self.publisher.removeObserver(self._access_only)
            ACCESS_PUBLISHER.removeObserver(self)
        clock = _Clock(self.reactor)
        self.trail = self.start_trail(clock)
        held, self.held = self.held, []
        for at, event in held:
            clock.at = at
            self.trail(event)
        clock.at = None
        log.info("audit trail started; {count} records kept meanwhile written", count=len(held))

    def stop(self) -> defer.Deferred[Any]:
        try:
            self.release()
        except OSError as e:  # the outputs could not be opened (already logged at the first try)
            log.error("audit trail not started at stop: {error}", error=str(e))
            return defer.succeed(None)
        return defer.maybeDeferred(self.trail.stop)


def predecessor() -> int | None:
    """In a successor started by a restart: the pid of the process it replaces (its parent)."""
    return os.getppid() if HANDOVER_FD_ENV in os.environ else None


def start_audit(holder: Any, reactor: Any) -> Any:
    """The audit trail of a single process: at once, or once the predecessor has exited."""
    from ccproxy.audit import AuditTrail, start

    parent = predecessor()
    if parent is None:
        return start(holder, reactor)
    return HeldAudit(lambda clock: AuditTrail(holder, clock).start(), reactor, parent).start()
