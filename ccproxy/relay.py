"""Carrying an upstream response body to the client, as it arrives."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from ccproxy import events
from ccproxy.context import BodyFilter
from ccproxy.deadline import Deadline
from ccproxy.errors import ApiError, sse_error_event

if TYPE_CHECKING:
    from ccproxy.http.budget import Budget
    from ccproxy.http.request import ProxyRequest as Request

log = Logger()

# A buffered (rewritten as a whole) body larger than this is cut rather than held in memory.
MAX_BUFFERED_BODY = 64 * 1024 * 1024


# Told how many server-sent events each piece of a streamed body completes (ccproxy.metrics).
stream_events: Callable[[str, int], None] | None = None


class Relay(Protocol):
    """Writes the upstream body to the client with back-pressure; `done` fires when it is over.

    `write_head(length)` sends the status and headers: at once when streaming, or once the body is
    whole when a buffering filter must see all of it first (its new length is then known).
    """

    def __init__(
        self,
        request: Request,
        clock: IReactorTime,
        idle_timeout: float,
        write_head: Callable[[int | None], None],
        api: str,
        sse: bool,
        body_filter: BodyFilter | None = None,
        buffered: bool = False,
        on_broken: Callable[[ApiError], None] | None = None,
        budget: Budget | None = None,
    ) -> None:
        self.request = request
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.write_head = write_head
        self.api = api
        self.sse = sse
        self.filter = body_filter
        self.buffered = buffered
        self.on_broken = on_broken
        self._chunks: list[bytes] = []
        self._size = 0
        # Made when first armed and dropped when the relay ends: a Deadline calls back into the
        # relay, so keeping it would tie every finished relay (and its request) in a reference
        # cycle that only the garbage collector frees.
        self._timer: Deadline | None = None
        self._timed_out = False
        self._cancelled = False
        self._registered = False
        self._newline = False
        self.done: defer.Deferred[None] = defer.Deferred(self._cancel)
        # A body held whole for its filter takes from the process's buffer budget while it is held;
        # however the relay ends (done fires on every path), that is given back.
        self.budget = budget
        self._held = 0
        if buffered and budget is not None:
            self.done.addBoth(self._release)

    def connectionMade(self) -> None:
        if not self.buffered:
            self.write_head(None)

    def watch(self) -> None:
        """Called once what arrived with the head has been delivered: a body still to come gets
        back-pressure (the upstream paused while the client's buffers are full) and the idle
        timer. Most small bodies are whole by then and need neither."""
        if self.done.called or self._cancelled:
            return
        self.request.registerProducer(self.transport, True)  # type: ignore[arg-type]  # a TransportProxyProducer
        self._registered = True
        if self._timer is None or not self._timer.armed:
            self._arm()

    def dataReceived(self, data: bytes) -> None:
        if self._timer is not None and self._timer.armed:
            self._arm()
        if self.buffered:
            self._size += len(data)
            if self._size > MAX_BUFFERED_BODY:
                self._give_up(ApiError(502, "upstream response too large to inspect"))
                return
            if self.budget is not None:
                if not self.budget.acquire(len(data)):
                    events.emit("server_overloaded", "warning", reason="max_buffered_bytes",
                                limit=self.budget.limit(), buffered="response")
                    self._give_up(ApiError(503, "ccproxy is holding as many response bodies as it may; "
                                                "retry shortly", headers={"retry-after": "1"}))
                    return
                self._held += len(data)
            self._chunks.append(data)
            return
        if self.filter is not None:
            try:
                data = self.filter.feed(data)
            except Exception:
                self._filter_failed()
                return
        if data:
            if self.sse and stream_events is not None:
                # An event ends at a blank line; one split across two reads is counted once.
                count = data.count(b"\n\n") + (self._newline and data[:1] == b"\n")
                self._newline = data[-1:] == b"\n"
                stream_events(self.api, count)
            self.request.write(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        self._disarm()
        self._unregister()
        if self._cancelled or self.done.called:
            return
        if isinstance(reason.value, ResponseDone | PotentialDataLoss):
            self._complete()
        elif self._timed_out:
            self._broken(ApiError(504, f"upstream sent nothing for {self.idle_timeout:g}s"))
        else:
            log.warn("upstream body cut: {reason}", reason=reason.getErrorMessage())
            self._broken(ApiError(502, "upstream connection lost mid-response"))

    def _complete(self) -> None:
        try:
            if self.buffered:
                body = b"".join(self._chunks)
                self._chunks = []
                if self.filter is not None:
                    body = self.filter.feed(body) + self.filter.close()
            elif self.filter is not None:
                body = self.filter.close()
        except ApiError as refusal:
            # The filter refused what it read (ambiguous JSON): the client is told why, not "could not inspect".
            log.warn("upstream response refused: {reason}", reason=refusal.message)
            self.filter = None
            self._give_up(refusal)
            return
        except Exception:
            self._filter_failed()
            return
        if self.buffered:
            self.write_head(len(body))
        if self.buffered or self.filter is not None:
            if body:
                self.request.write(body)
        self.request.finish()
        self.done.callback(None)

    def _filter_failed(self) -> None:
        """A body filter raised: nothing it had not yet passed may reach the client unfiltered."""
        log.failure("response filter failed; the response is cut")
        self.filter = None
        self._give_up(ApiError(502, "upstream response could not be inspected"))

    def _broken(self, error: ApiError) -> None:
        if self.on_broken is not None:
            self.on_broken(error)
        # A held-back tail is never flushed here: it may be the start of a secret.
        if self.sse and not self.buffered:
            self.request.write(sse_error_event(self.api, error))
            self.request.finish()
        elif self.buffered and not self.request.head_sent:
            self.done.errback(error)
            return
        else:
            # The client must see a truncated body as truncated, not as complete.
            self.request.abort()
        self.done.callback(None)

    def _give_up(self, error: ApiError) -> None:
        self._chunks = []
        self._broken(error)
        self._stop_upstream()

    def _arm(self) -> None:
        if self._timer is None:
            self._timer = Deadline(self.clock, self._idle)
        self._timer.arm(self.idle_timeout)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _idle(self) -> None:
        self._timed_out = True
        self._stop_upstream()

    def _stop_upstream(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]  # a TransportProxyProducer

    def _unregister(self) -> None:
        if not self._registered:
            return
        self._registered = False
        # Fails once the client channel is gone; nothing is left to unregister then.
        try:
            self.request.unregisterProducer()
        except (AttributeError, RuntimeError):
            pass

    def _release(self, result: object) -> object:
        if self.budget is not None and self._held:
            self.budget.release(self._held)
            self._held = 0
        return result

    def _cancel(self, _: defer.Deferred[None]) -> None:
        """The client went away: stop reading upstream at once."""
        self._cancelled = True
        self._disarm()
        self._stop_upstream()
