"""Side calls (JWKS, token introspection): bounded in time, never a hang, never a secret in a log."""

from __future__ import annotations

import json
from typing import Any

import treq
from twisted.internet import defer, error
from twisted.internet.interfaces import IReactorTime


class SideCallFailed(Exception):
    """A side call that gave nothing usable; the message is safe to show to a client."""


def http_client(reactor: Any) -> tuple[Any, Any]:
    """A treq client of its own (and its pool), so side calls never share connections or cookies
    with forwarding."""
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 8
    return HTTPClient(Agent(reactor, pool=pool, connectTimeout=10)), pool


async def fetch_json(what: str, clock: IReactorTime, timeout: float, call: Any) -> tuple[int, Any]:
    """Await `call()` (a treq request) and its JSON body within `timeout` seconds in all."""

    async def run() -> tuple[int, Any]:
        response = await call()
        body = await treq.content(response)
        return response.code, body

    d = defer.ensureDeferred(run())
    timed_out = False

    def on_timeout() -> None:
        nonlocal timed_out
        timed_out = True
        d.cancel()

    # Our own timer, not addTimeout: a cancelled request may fail with an error other than
    # CancelledError, and the client must still be told it was a timeout.
    timer = clock.callLater(timeout, on_timeout)
    try:
        code, body = await d
    except Exception as e:
        if timed_out:
            raise SideCallFailed(f"{what} did not answer within {timeout:g}s") from None
        if isinstance(e, defer.CancelledError):
            raise
        if isinstance(e, error.ConnectError | error.DNSLookupError | error.TimeoutError):
            raise SideCallFailed(f"{what} is unreachable") from None
        raise SideCallFailed(f"{what} failed") from None
    finally:
        if timer.active():
            timer.cancel()
    if code != 200:
        raise SideCallFailed(f"{what} answered HTTP {code}")
    try:
        return code, json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise SideCallFailed(f"{what} did not answer with JSON") from None
