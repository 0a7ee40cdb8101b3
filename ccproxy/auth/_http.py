"""Side calls (JWKS, token introspection): bounded in time, never a hang, never a secret in a log."""

from __future__ import annotations

import json
from typing import Any

import treq
from twisted.internet import defer, error
from twisted.internet.interfaces import IReactorTime

from ccproxy.deadline import TimedOut, within


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

    try:
        code, body = await within(clock, timeout, defer.ensureDeferred(run()))
    except TimedOut:
        raise SideCallFailed(f"{what} did not answer within {timeout:g}s") from None
    except defer.CancelledError:
        raise
    except (error.ConnectError, error.DNSLookupError, error.TimeoutError):
        raise SideCallFailed(f"{what} is unreachable") from None
    except Exception:
        raise SideCallFailed(f"{what} failed") from None
    if code != 200:
        raise SideCallFailed(f"{what} answered HTTP {code}")
    try:
        return code, json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise SideCallFailed(f"{what} did not answer with JSON") from None
