"""Retiring a process that a successor replaces: stop accepting, let open connections finish, exit."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

# How long open connections may take to finish before the process exits anyway.
DRAIN_TIMEOUT = 30.0
_POLL = 0.05


async def drain(port: Any, open_connections: Callable[[], int], clock: Any, timeout: float = DRAIN_TIMEOUT) -> int:
    """Stop accepting on `port`, then wait until no connection is open, or `timeout` passes.

    Connections not yet accepted stay in the socket's queue for the processes that still accept on
    it (a successor, the other workers). Returns how many connections were still open at the end.
    """
    await defer.maybeDeferred(port.stopListening)
    deadline = clock.seconds() + timeout
    while open_connections() > 0 and clock.seconds() < deadline:
        await task.deferLater(clock, _POLL, lambda: None)
    left = open_connections()
    if left:
        log.warn("drain: {count} connections still open after {timeout:g} s; closing them", count=left,
                 timeout=timeout)
    return left


def retire(port: Any, open_connections: Callable[[], int], reactor: Any, why: str,
           timeout: float = DRAIN_TIMEOUT) -> defer.Deferred[None]:
    """Drain, then stop the reactor (twistd then stops the services and exits)."""
    log.info("draining: {why}; no longer accepting, waiting for {count} open connections", why=why,
             count=open_connections())

    async def run() -> None:
        await drain(port, open_connections, reactor, timeout)
        log.info("drained; exiting")
        _stop(reactor)

    def failed(failure: Failure) -> None:
        log.failure("drain failed; exiting", failure)
        _stop(reactor)

    d = defer.ensureDeferred(run())
    d.addErrback(failed)
    return d


def _stop(reactor: Any) -> None:
    if reactor.running:  # not when it is already shutting down (a SIGTERM meanwhile)
        reactor.stop()
