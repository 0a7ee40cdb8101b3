"""`monitoring.security_alerts`: rules over the security events, in sliding windows, per group.

The engine is an observer of ccproxy.events: it counts, never blocks, and does its outside work
(webhooks) later, on the reactor. A rule fires once when its condition starts to hold for a group
and stays quiet while it holds (10,000 failures a minute make one alert); once the window holds no
more than the threshold again, the next excess fires again.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

import attrs

from ccproxy import events
from ccproxy.config.monitoring import SUSPICIOUS, AlertRule, Condition, MonitoringConfig


class SlidingCount:
    """Whether more than `threshold` events fell in the last `window` seconds: exact, keeping only
    the last threshold + 1 times."""

    __slots__ = ("firing", "suppressed", "times", "window")

    def __init__(self, threshold: int, window: float) -> None:
        self.times: deque[float] = deque(maxlen=threshold + 1)
        self.window = window
        self.firing = False
        self.suppressed = 0

    def add(self, now: float) -> bool:
        """Count one event at `now`; whether the condition holds after it."""
        times = self.times
        times.append(now)
        return len(times) == times.maxlen and times[0] > now - self.window


@attrs.frozen
class Alert:
    rule: str
    action: str
    group_by: str
    group: str
    count: int  # events in the window when it fired
    threshold: int
    window: float
    condition: str
    at: float
    detector: str | None = None


class RuleState:
    """The windows of one rule, per group, least recently seen forgotten first past `max_groups`."""

    def __init__(self, rule: AlertRule, max_groups: int) -> None:
        self.rule = rule
        self.max_groups = max_groups
        self.groups: OrderedDict[str, SlidingCount] = OrderedDict()

    def add(self, group: str, now: float) -> SlidingCount | None:
        """The group's window if this event makes the rule fire, else None."""
        window = self.groups.get(group)
        if window is None:
            if len(self.groups) >= self.max_groups:
                self.groups.popitem(last=False)
            condition = self.rule.condition
            window = self.groups[group] = SlidingCount(condition.threshold, condition.window)
        else:
            self.groups.move_to_end(group)
        holds = window.add(now)
        if not holds:
            window.firing = False
            return None
        if window.firing:
            window.suppressed += 1
            return None
        window.firing = True
        return window


_GROUP_FIELDS = {"ip": "ip_address", "api_key": "api_key_id"}


class AlertEngine:
    """Feeds events to the rules of the live config; `fire` gets each alert (once per episode)."""

    def __init__(self, config: Callable[[], MonitoringConfig], clock: Any, fire: Callable[[Alert], None]) -> None:
        self.config = config
        self.clock = clock
        self.fire = fire
        self.applied: MonitoringConfig | None = None
        self.by_event: dict[str, list[RuleState]] = {}
        self._busy = False

    def _update(self, config: MonitoringConfig) -> None:
        """Rebuild the rules for a new config; an unchanged rule keeps its windows."""
        old = {(s.rule.name, s.rule.condition, s.rule.group_by): s
               for states in self.by_event.values() for s in states}
        by_event: dict[str, list[RuleState]] = {}
        for rule in config.rules:
            state = old.get((rule.name, rule.condition, rule.group_by))
            if state is None:
                state = RuleState(rule, config.max_groups)
            else:
                state.rule, state.max_groups = rule, config.max_groups
            by_event.setdefault(rule.condition.event, []).append(state)
        self.by_event = by_event
        self.applied = config

    def observe(self, event: dict[str, Any]) -> None:
        config = self.config()
        if config is not self.applied:
            self._update(config)
        states = self.by_event.get(event.get("ccproxy_event", ""))
        if not states or self._busy:
            return
        self._busy = True  # what an alert does emits events too; they are not counted again
        try:
            now = self.clock.seconds()
            for state in states:
                self._count(state, event, now)
        finally:
            self._busy = False

    def _count(self, state: RuleState, event: dict[str, Any], now: float) -> None:
        rule = state.rule
        condition: Condition = rule.condition
        if condition.detector is not None and event.get("detector") != condition.detector:
            return
        if rule.group_by == "global":
            group = "*"
        else:
            value = event.get(_GROUP_FIELDS[rule.group_by])
            if not value or not isinstance(value, str) or value == "-":
                return
            group = value
        window = state.add(group, now)
        if window is not None:
            self.fire(Alert(rule.name, rule.action, rule.group_by, group, len(window.times), condition.threshold,
                            condition.window, condition.describe(), now, condition.detector))


def report(alert: Alert) -> None:
    """The audit record of an alert: severity alert, so syslog gets it at that priority."""
    # An address goes in ip_address alone: the field the audit trail and the daemon log anonymise.
    group = {"ip_address": alert.group} if alert.group_by == "ip" else {"group": alert.group}
    events.emit("security_alert", "alert", rule=alert.rule, action=alert.action, group_by=alert.group_by,
                count=alert.count, threshold=alert.threshold, window=alert.window,
                condition=alert.condition, detector=alert.detector, **group)


__all__ = ["SUSPICIOUS", "Alert", "AlertEngine", "RuleState", "SlidingCount", "report"]
