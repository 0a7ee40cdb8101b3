"""Security events: every policy layer reports through here; the audit trail listens.

Every event goes, whole and unthrottled, to the observers added with `add_observer` (the audit
trail). The daemon's own log (twisted.logger, so syslog under systemd) gets it too, as an event with
`ccproxy_event` set to its name, but at a bounded rate per event name: a flood of refusals must not
become a flood of log lines that costs more than the refusals themselves. What the budget holds back
is counted and reported on the next line of the same event (`suppressed=N`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger, LogLevel

NAMESPACE = "ccproxy.events"
_log = Logger(namespace=NAMESPACE)

_LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "notice": LogLevel.info,
    "warning": LogLevel.warn,
    "error": LogLevel.error,
    "critical": LogLevel.critical,
    "alert": LogLevel.critical,
}


# Fields that hold client addresses; with anonymised logs the daemon log shows them only through
# the filter (the audit trail anonymises the raw values itself).
ADDRESS_FIELDS = frozenset({"ip_address", "client_ip", "ip", "peer", "remote_ip", "source_ip"})
_address_filter: Callable[[str], str] | None = None
_filtered_fields: frozenset[str] = ADDRESS_FIELDS


Observer = Callable[[dict[str, Any]], None]
# observer -> the event names it wants (None: every event).
_observers: dict[Observer, frozenset[str] | None] = {}
# name -> the observers that want it, rebuilt as observers come and go: most requests emit an
# event (authentication_success) that many observers ignore, and building it for none is waste.
_by_name: dict[str, tuple[Observer, ...]] = {}


def add_observer(observer: Observer, names: frozenset[str] | None = None) -> None:
    """`observer` gets every event (a dict: ccproxy_event, severity and the fields), or with
    `names`, only the events of those names."""
    _observers[observer] = names
    _by_name.clear()


def remove_observer(observer: Observer) -> None:
    if _observers.pop(observer, 0) != 0:
        _by_name.clear()


def _observers_of(name: str) -> tuple[Observer, ...]:
    found = _by_name.get(name)
    if found is None:
        found = _by_name[name] = tuple(o for o, names in _observers.items() if names is None or name in names)
    return found


class LogBudget:
    """Per event name, a token bucket of daemon-log lines: `rate` a second, bursts of `burst`."""

    def __init__(self, clock: Callable[[], float], rate: float = 20.0, burst: float = 200.0) -> None:
        self.clock = clock
        self.rate = rate
        self.burst = burst
        self._tokens: dict[str, tuple[float, float, int]] = {}  # name -> (tokens, at, suppressed)

    def allow(self, name: str) -> tuple[bool, int]:
        """Whether a line may be written now, and how many were held back since the last one."""
        now = self.clock()
        tokens, at, suppressed = self._tokens.get(name, (self.burst, now, 0))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens < 1.0:
            self._tokens[name] = (tokens, now, suppressed + 1)
            return False, 0
        self._tokens[name] = (tokens - 1.0, now, 0)
        return True, suppressed


# The budget in force is the last one handed in: a running service's, counting with its reactor's
# clock; outside one (config checks, tools), the process's monotonic clock.
_budgets: list[LogBudget] = [LogBudget(time.monotonic)]


def paced_by(budget: LogBudget) -> Callable[[], None]:
    """Pace the daemon log with `budget` until the function returned is called (a service does this
    for its lifetime with a budget on its own clock; nothing outlives it)."""
    _budgets.append(budget)

    def release() -> None:
        if budget in _budgets:
            _budgets.remove(budget)

    return release


def set_address_filter(address_filter: Callable[[str], str] | None,
                       fields: frozenset[str] = ADDRESS_FIELDS) -> None:
    """How addresses (or other `fields`) appear in the daemon's log text (privacy.gdpr); None: as they are."""
    global _address_filter, _filtered_fields
    _address_filter, _filtered_fields = address_filter, fields


def emit(name: str, severity: str = "info", **fields: Any) -> None:
    """Report security event `name`. Fields must hold no secret: pass key ids and masks only."""
    observers = _observers_of(name) if _observers else ()
    if observers:
        whole = {"ccproxy_event": name, "severity": severity, **fields}
        for observer in observers:
            observer(dict(whole))
    allowed, suppressed = _budgets[-1].allow(name)
    if not allowed:
        return
    if suppressed:
        fields["suppressed"] = suppressed
    parts = []
    for key, value in list(fields.items()):
        if key.startswith("_"):
            continue
        if _address_filter is not None and key in _filtered_fields and isinstance(value, str):
            fields[f"_shown_{key}"] = _address_filter(value)
            parts.append(f"{key}={{_shown_{key}}}")
        else:
            parts.append(f"{key}={{{key}}}")
    text = " ".join(parts)
    _log.emit(
        _LEVELS.get(severity, LogLevel.info),
        "{ccproxy_event} " + text,
        ccproxy_event=name,
        severity=severity,
        **fields,
    )
