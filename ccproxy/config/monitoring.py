"""`monitoring`: security alert rules and where alerts go (docs/incident-response.md).

A rule's condition is one of:

    NAME > N in DURATION      more than N events NAME in any DURATION (sliding), per group
    NAME >= N in DURATION     N or more
    DETECTOR                  a detector alone: any match (`DETECTOR > 0 in 5m`)

NAME is an audit event name (`authentication_failure`, `rate_limit_exceeded`, ...), one of the short
names in `SHORT_NAMES`, or a detector name (ccproxy.monitoring.detectors). Anything else is refused.
"""

from __future__ import annotations

import difflib
import re
from urllib.parse import urlsplit

import attrs

from ccproxy.config._reader import ConfigError, Section, parse_duration
from ccproxy.config.audit import KNOWN_EVENTS
from ccproxy.monitoring.detectors import DETECTORS
from ccproxy.secrets import Secret

ALERT, BLOCK_IP, ALERT_AND_BLOCK = "alert", "block_ip", "alert_and_block"
ACTIONS = (ALERT, BLOCK_IP, ALERT_AND_BLOCK)
GROUPS = ("ip", "api_key", "global")
FORMATS = ("json", "alertmanager", "slack")
# The detectors' matches are reported as this event, with `detector` naming which.
SUSPICIOUS = "suspicious_request"

SHORT_NAMES = {
    "auth_failures": "authentication_failure",
    "rate_limit_exceeded": "rate_limit_exceeded",
    "rate_limited": "rate_limit_exceeded",
    "invalid_requests": "invalid_request",
    "requests_too_large": "request_too_large",
    "request_timeouts": "request_timeout",
    "connections_refused": "connection_refused",
    "upstream_errors": "upstream_error",
    "auto_blocks": "ip_auto_blocked",
}
# What a rule may not count: its own consequences.
_NOT_COUNTED = frozenset({"security_alert", "admin_command", "ip_blocked"})
MAX_THRESHOLD = 100_000
DETECTOR_WINDOW = 300.0

_CONDITION = re.compile(r"^\s*([a-z_]+)\s*(?:(>=|>)\s*(\d+)\s+in\s+(\S+))?\s*$")
_RULE_NAME = re.compile(r"^[a-z0-9_.-]{1,64}$")


@attrs.frozen
class Condition:
    event: str  # the audit event counted (SUSPICIOUS for a detector)
    detector: str | None  # which detector, when event is SUSPICIOUS
    threshold: int  # the condition holds when more than this many fall in the window
    window: float

    def describe(self) -> str:
        name = self.detector or self.event
        return f"{name} > {self.threshold} in {self.window:g}s"


def parse_condition(text: str, path: str) -> Condition:
    match = _CONDITION.match(text)
    if match is None:
        raise ConfigError(path, f"expected 'NAME > N in DURATION' or a detector name, got {text!r}")
    name, op, number, window = match.groups()
    detector = name if name in DETECTORS else None
    event = SUSPICIOUS if detector else SHORT_NAMES.get(name, name)
    if detector is None and (event not in KNOWN_EVENTS or event in _NOT_COUNTED):
        countable = sorted({*SHORT_NAMES, *DETECTORS, *KNOWN_EVENTS} - _NOT_COUNTED)
        hint = difflib.get_close_matches(name, countable, n=1, cutoff=0.75)
        if hint:
            raise ConfigError(path, f"unknown event or detector {name!r} (did you mean {hint[0]}?)")
        known = ", ".join(sorted({*SHORT_NAMES, *DETECTORS}))
        raise ConfigError(path, f"unknown event or detector {name!r} (short names and detectors: {known}; "
                                f"or an audit event name)")
    if op is None:
        if detector is None:
            raise ConfigError(path, f"{name!r} is an event, not a detector: say 'NAME > N in DURATION'")
        return Condition(event, detector, 0, DETECTOR_WINDOW)
    threshold = int(number) - (1 if op == ">=" else 0)
    if threshold < 0 or threshold > MAX_THRESHOLD:
        raise ConfigError(path, f"the count must be between {1 if op == '>=' else 0} and {MAX_THRESHOLD}")
    seconds = parse_duration(window, path)
    if not 1.0 <= seconds <= 86400.0:
        raise ConfigError(path, "the window must be between 1s and 24h")
    return Condition(event, detector, threshold, seconds)


@attrs.frozen
class AlertRule:
    name: str
    condition: Condition
    action: str = ALERT
    group_by: str = "ip"
    # How long a block_ip / alert_and_block rule blocks; None: security.ip_blacklist.auto_block.duration.
    duration: float | None = None

    @property
    def alerts(self) -> bool:
        return self.action in (ALERT, ALERT_AND_BLOCK)

    @property
    def blocks(self) -> bool:
        return self.action in (BLOCK_IP, ALERT_AND_BLOCK)

    @classmethod
    def parse(cls, section: Section) -> AlertRule:
        name = section.string("name")
        if not _RULE_NAME.match(name):
            raise ConfigError(section.at("name"), "use lower-case letters, digits, '_', '.' or '-' (at most 64)")
        condition = parse_condition(section.string("condition"), section.at("condition"))
        action = section.string("action", ALERT, choices=ACTIONS)
        group_by = section.string("group_by", "ip", choices=GROUPS)
        duration = section.duration("duration", None, min=1.0)
        rule = cls(name, condition, action, group_by, duration)
        if rule.blocks and group_by != "ip":
            raise ConfigError(section.at("action"), f"{action} blocks an address: it needs group_by: ip")
        if duration is not None and not rule.blocks:
            raise ConfigError(section.at("duration"), "only used by block_ip and alert_and_block")
        section.done()
        return rule


@attrs.frozen
class WebhookOutput:
    # A Secret: webhook URLs often carry their token (Slack's do); check-config shows a mask.
    url: Secret
    format: str = "json"
    timeout: float = 5.0
    retries: int = 5

    @classmethod
    def parse(cls, section: Section) -> WebhookOutput:
        section.string("type", choices=("webhook",))
        url = section.secret("url")
        if url is None:
            raise ConfigError(section.at("url"), "is required")
        parts = urlsplit(url.reveal())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(section.at("url"), f"expected an http(s) URL, got {url.masked()!r}")
        output = cls(
            url=url,
            format=section.string("format", "json", choices=FORMATS),
            timeout=section.duration("timeout", 5.0, min=0.1, max=60.0),
            retries=section.integer("retries", 5, min=0, max=20),
        )
        section.done()
        return output


@attrs.frozen
class MonitoringConfig:
    rules: tuple[AlertRule, ...] = ()
    outputs: tuple[WebhookOutput, ...] = ()
    # Groups (addresses, keys) followed per rule; past this the least recently seen is forgotten.
    max_groups: int = 10_000

    @property
    def detectors(self) -> tuple[str, ...]:
        return tuple(sorted({r.condition.detector for r in self.rules if r.condition.detector}))

    @classmethod
    def parse(cls, root: Section) -> MonitoringConfig:
        section = root.section("monitoring")
        if not section.enabled(bool(section.data)):
            section.raw("security_alerts", None)
            section.raw("alert_outputs", None)
            section.raw("max_groups", None)
            return cls()
        rules = section.items("security_alerts", lambda item, path: AlertRule.parse(Section(item, path)))
        seen: set[str] = set()
        for i, rule in enumerate(rules):
            if rule.name in seen:
                raise ConfigError(f"{section.at('security_alerts')}[{i}].name", f"{rule.name!r} is used twice")
            seen.add(rule.name)
        outputs = section.items("alert_outputs", lambda item, path: WebhookOutput.parse(Section(item, path)))
        return cls(rules, outputs, section.integer("max_groups", 10_000, min=1, max=1_000_000))
