"""Helpers for the rate-limit tests: a settable clock over the real reactor, config shortcuts."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor as _reactor

from ccproxy.blocklist import BlockList
from ccproxy.config import parse
from ccproxy.config.limits import LimitsConfig
from ccproxy.runtime import Deps

# A realistic epoch time, so float precision is tested at the magnitude production sees.
T0 = 1_750_000_000.0


class FakeTime:
    """`seconds()` is whatever the test says; timers (Redis timeouts, housekeeping) stay real, so
    the real reactor still drives real sockets."""

    def __init__(self, now: float = T0) -> None:
        self.now = now
        self.real: Any = _reactor

    def seconds(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def callLater(self, delay: float, f: Any, *args: Any, **kw: Any) -> Any:
        return self.real.callLater(delay, f, *args, **kw)

    def getDelayedCalls(self) -> Any:
        return self.real.getDelayedCalls()


def limits_config(rate_limiting: dict[str, Any] | None = None, auto_block: dict[str, Any] | None = None,
                  state: dict[str, Any] | None = None) -> LimitsConfig:
    data: dict[str, Any] = {"server": {"tls": {"enabled": False}}, "security": {}}
    if rate_limiting is not None:
        data["security"]["rate_limiting"] = rate_limiting
    if auto_block is not None:
        # ip_blacklist's own keys belong to the network config; `enabled: false` keeps them out.
        data["security"]["ip_blacklist"] = {"enabled": False, "auto_block": auto_block}
    if state is not None:
        data["state"] = state
    return parse(data).limits


def deps(clock: FakeTime) -> Deps:
    return Deps(reactor=clock, blocklist=BlockList())
