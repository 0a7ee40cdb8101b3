"""Retiring a process that a successor replaces: stop accepting, drain as at shutdown, exit.

The drain is the service's own (`ccproxy.drain`), bounded by `server.drain_timeout`: kept-alive
connections close after their response, idle ones at once, and what is still under way when the
timeout passes is cut with its access line and `request_timeout` event. Connections not yet
accepted stay in the socket's queue for the processes that still accept on it (a successor, the
other workers).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from ccproxy.drain import drain, open_channels

log = Logger()

# What the supervisor adds to `server.drain_timeout` before it kills a worker still there: the cut
# itself, the audit trail's close and the process's exit.
EXIT_MARGIN = 5.0


def retire(service: Any, why: str) -> defer.Deferred[None]:
    """Stop accepting on `service.port`, drain `service.site` for up to the config's
    `server.drain_timeout`, then stop the reactor (twistd then stops the services and exits)."""
    reactor = service.reactor
    timeout = service.config.server.drain_timeout
    site = service.site
    log.info("draining: {why}; no longer accepting, waiting for {count} open connections for up to {timeout:g} s",
             why=why, count=len(open_channels(site)), timeout=timeout)

    async def run() -> None:
        await defer.maybeDeferred(service.port.stopListening)
        finished, cut = await drain(site, reactor, timeout)
        if cut:
            log.warn("drain: {cut} request(s) still under way after drain_timeout={timeout:g}s were cut; "
                     "{finished} finished", cut=cut, finished=finished, timeout=timeout)
        log.info("drained; exiting")
        _stop(reactor)

    def failed(failure: Failure) -> None:
        log.failure("drain failed; exiting", failure)
        _stop(reactor)

    d = defer.ensureDeferred(run())
    d.addErrback(failed)
    return d


def kill_after(timeout: float) -> float:
    """How long a drained process may take to exit before it is killed."""
    return timeout + EXIT_MARGIN


def _stop(reactor: Any) -> None:
    if reactor.running:  # not when it is already shutting down (a SIGTERM meanwhile)
        reactor.stop()

