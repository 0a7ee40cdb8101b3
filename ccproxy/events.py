"""Security events: every policy layer reports through here; the audit trail listens.

An event is a twisted.logger event with `ccproxy_event` set to its name, so tests can observe it and
any log observer can pick it up without the emitter knowing who listens.
"""

from __future__ import annotations

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
}


# Fields that hold client addresses; with anonymised logs the daemon log shows them only through
# the filter (the audit trail anonymises the raw values itself).
ADDRESS_FIELDS = frozenset({"ip_address", "client_ip", "ip", "peer", "remote_ip", "source_ip"})
_address_filter: Callable[[str], str] | None = None


def set_address_filter(address_filter: Callable[[str], str] | None) -> None:
    """How addresses appear in the daemon's log text (privacy.gdpr.anonymize_logs); None: as they are."""
    global _address_filter
    _address_filter = address_filter


def emit(name: str, severity: str = "info", **fields: Any) -> None:
    """Report security event `name`. Fields must hold no secret: pass key ids and masks only."""
    parts = []
    for key, value in list(fields.items()):
        if key.startswith("_"):
            continue
        if _address_filter is not None and key in ADDRESS_FIELDS and isinstance(value, str):
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
