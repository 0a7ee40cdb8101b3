"""One audit trail for all workers: workers forward their events, the supervisor seals and writes.

The supervisor runs the only `AuditTrail` (so one hash chain per stream, one writer per file and
syslog output). A worker's `AuditForwarder` observes what the trail would observe (security events,
access lines) and sends them to the supervisor in one message per reactor turn; events from before
the channel is connected wait in a bounded queue. Events that already left a worker are read by the
supervisor even if the worker dies right after: the socket keeps them.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from twisted.logger import ILogObserver, LogPublisher, globalLogPublisher
from twisted.python import threadable
from zope.interface import implementer

from ccproxy import events
from ccproxy.audit._trail import ACCESS_NAMESPACE, _AccessOnly
from ccproxy.site import ACCESS_PUBLISHER
from ccproxy.workers.state import SharedStore

# Events kept while the channel is not (yet) connected; older ones are dropped past this.
MAX_QUEUED = 10_000
# What the trail reads of an event besides its fields; the rest of Twisted's log keys stay here.
_KEPT_LOG_KEYS = frozenset({"log_namespace"})
_PLAIN = (str, int, float, bool, type(None))


def _plain(value: Any) -> Any:
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def portable(event: dict[str, Any]) -> dict[str, Any]:
    """The part of a log event the audit trail uses, as JSON values."""
    return {k: _plain(v) for k, v in event.items() if not k.startswith("log_") or k in _KEPT_LOG_KEYS}


@implementer(ILogObserver)
class AuditForwarder:
    def __init__(self, holder: Any, link: SharedStore, publisher: LogPublisher = globalLogPublisher) -> None:
        self.holder = holder
        self.link = link
        self.reactor = link.reactor
        self.publisher = publisher
        self.queue: list[dict[str, Any]] = []
        self.dropped = 0
        self._flush_call: Any = None
        # The same filter the trail puts on the global log: access lines only.
        self._access_only = _AccessOnly(self)  # type: ignore[arg-type]

    def start(self) -> AuditForwarder:
        events.add_observer(self)
        self.publisher.addObserver(self._access_only)
        ACCESS_PUBLISHER.addObserver(self)
        return self

    def stop(self) -> None:
        events.remove_observer(self)
        self.publisher.removeObserver(self._access_only)
        ACCESS_PUBLISHER.removeObserver(self)
        self.flush()

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("ccproxy_event") is None and event.get("log_namespace") != ACCESS_NAMESPACE:
            return
        if threadable.ioThread is not None and not threadable.isInIOThread():
            self.reactor.callFromThread(self, event)
            return
        if not self.holder.current.config.audit.enabled:
            return
        if len(self.queue) >= MAX_QUEUED:
            self.queue.pop(0)
            self.dropped += 1
        self.queue.append(portable(event))
        if self._flush_call is None:
            self._flush_call = self.reactor.callLater(0, self.flush)

    def flush(self) -> None:
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        send = self.link.asker.send
        if send is None or not self.queue:
            return  # kept until the channel is connected (see `Worker`)
        batch, self.queue = self.queue, []
        send("audit", events=batch, dropped=self.dropped)
        self.dropped = 0


class AuditWriter:
    """In the supervisor: the one trail, fed with the workers' events and following its config."""

    def __init__(self, config: Any, reactor: Any) -> None:
        from ccproxy.audit import AuditTrail

        self.holder = SimpleNamespace(current=SimpleNamespace(config=config))
        self.reactor = reactor
        # Its own publisher: the supervisor's log has no access lines; security events it emits
        # itself still reach the trail through ccproxy.events.
        self.trail: Any = AuditTrail(self.holder, reactor, publisher=LogPublisher())

    def start(self, parent: int | None) -> None:
        """`parent`: the pid of the supervisor this one replaces, if it was started by a restart."""
        from ccproxy.audit import AuditTrail
        from ccproxy.workers.heldaudit import HeldAudit

        if parent is None:
            self.trail.start()
            return
        # A restart: the previous supervisor writes until it exits (see heldaudit).
        self.trail = HeldAudit(lambda clock: AuditTrail(self.holder, clock, publisher=LogPublisher()).start(),
                               self.reactor, parent, publisher=LogPublisher()).start()

    def configure(self, config: Any) -> None:
        self.holder.current = SimpleNamespace(config=config)

    def receive(self, message: dict[str, Any]) -> None:
        dropped = int(message.get("dropped") or 0)
        if dropped:
            events.emit("audit_records_lost", "error", count=dropped, output="worker queue",
                        reason="a worker could not reach the supervisor")
        for event in message.get("events", []):
            if isinstance(event, dict):
                self.trail(event)

    def stop(self) -> Any:
        return self.trail.stop()
