"""Security events: every policy layer reports through here; the audit trail listens.

An event is a twisted.logger event with `ccproxy_event` set to its name, so tests can observe it and
any log observer can pick it up without the emitter knowing who listens.
"""

from __future__ import annotations

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


def emit(name: str, severity: str = "info", **fields: Any) -> None:
    """Report security event `name`. Fields must hold no secret: pass key ids and masks only."""
    text = " ".join(f"{k}={{{k}}}" for k in fields if not k.startswith("_"))
    _log.emit(
        _LEVELS.get(severity, LogLevel.info),
        "{ccproxy_event} " + text,
        ccproxy_event=name,
        severity=severity,
        **fields,
    )
