"""Graceful drain at shutdown: finish what is under way, start nothing new, cut what overstays.

The service stops listening first (new connections are refused by the kernel), then `drain()`:

- the site is marked draining: a request that starts on a kept-alive connection is answered with
  `Connection: close`, and every connection closes after its response;
- kept-alive connections with no request under way close at once; a connection that has not yet
  carried a request (accepted just before, its request or TLS handshake on the way) gets up to
  FIRST_REQUEST_GRACE to send it, so that it is served rather than closed unanswered;
- requests and streams under way run to their end, for up to `server.drain_timeout`;
- what is left then is cut: each cut request gets its access line and a `request_timeout` event
  (`reason=drain_timeout`) before its connection is aborted, so the audit trail, which closes after
  the drain, holds a record of every request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ccproxy import events
from ccproxy.http.server import DEAD

log = Logger()

# How often the drain looks whether the last connection has gone.
POLL = 0.05
# After the cut, how long aborted connections get to report their loss (one reactor turn suffices).
CUT_GRACE = 1.0
# How long a connection that has carried no request yet may take to send its first during a drain
# (bytes in flight, a TLS handshake on a loaded machine); then it is closed like an idle one.
FIRST_REQUEST_GRACE = 5.0


def open_channels(site: Any) -> list[Any]:
    """Connections not yet lost or refused (a refused one closes by itself within its linger time).

    A channel the site has built but not yet started (its accept gate still deciding) has no phase:
    it counts as open."""
    return [channel for channel in list(site.channels)
            if getattr(channel, "phase", None) != DEAD or getattr(channel, "request", None) is not None]


def busy(channel: Any) -> bool:
    request = getattr(channel, "request", None)
    return request is not None and not request.finished


def fresh(channel: Any) -> bool:
    """Open, with no request yet: its first one may be on the way."""
    return (getattr(channel, "request", None) is None and getattr(channel, "served", 0) == 0
            and getattr(channel, "phase", None) != DEAD)


class Hurry:
    """Lets the drain be cut short (a second SIGTERM or SIGINT): `now()` makes it cut at once."""

    def __init__(self) -> None:
        self.asked = False

    def now(self) -> None:
        self.asked = True


async def drain(site: Any, clock: IReactorTime, timeout: float,
                status: Callable[[str], None] = lambda _: None, hurry: Hurry | None = None) -> tuple[int, int]:
    """Drain `site`'s connections; returns (requests finished during the drain, requests cut)."""
    site.draining = True
    channels = open_channels(site)
    in_flight = {id(c.request) for c in channels if busy(c)}
    for channel in channels:
        if not fresh(channel):
            channel.close_if_idle()
    deadline = clock.seconds() + timeout
    first_requests = clock.seconds() + min(timeout, FIRST_REQUEST_GRACE)
    announced = -1
    while True:
        now = clock.seconds()
        if now >= first_requests:
            _close_fresh(site)
        left = [c for c in open_channels(site) if busy(c)]
        waiting = now < first_requests and any(fresh(c) for c in site.channels)
        if (not left and not waiting) or now >= deadline or (hurry is not None and hurry.asked):
            break
        if len(left) != announced:
            announced = len(left)
            status(f"draining: {len(left)} request(s) under way, "
                   f"cut in {max(0.0, deadline - clock.seconds()):.0f}s")
        await task.deferLater(clock, POLL, lambda: None)
    _close_fresh(site)
    cut = 0
    for channel in open_channels(site):
        if busy(channel):
            cut += 1
            _record_cut(site, channel, channel.request, timeout)
        if getattr(channel, "transport", None) is not None:
            channel.transport.abortConnection()
    # Aborted connections report their loss on a later reactor turn: let them, so that what their
    # requests record on the way out reaches the audit trail before it closes.
    waited = 0.0
    while any(busy(c) for c in site.channels) and waited < CUT_GRACE:
        await task.deferLater(clock, POLL, lambda: None)
        waited += POLL
    return len(in_flight) - cut, cut


def _close_fresh(site: Any) -> None:
    for channel in list(site.channels):
        if fresh(channel) and hasattr(channel, "phase"):
            channel.close_if_idle()


def _record_cut(site: Any, channel: Any, request: Any, timeout: float) -> None:
    path = request.path[:200].decode("latin-1")
    events.emit("request_timeout", "warning", reason="drain_timeout", limit=timeout,
                request_id=request.request_id, method=request.method.decode("latin-1"), path=path,
                ip_address=channel.peer_host())
    try:
        site.log(request)
    except Exception:
        log.failure("access line of a request cut at shutdown")
