"""The audit trail: security events as sealed JSON records to rotating files and syslog.

`start(holder, reactor)` is called once by the service; the trail follows config reloads by itself.
"""

from __future__ import annotations

from typing import Any

from ccproxy.audit._trail import AuditTrail

__all__ = ["AuditTrail", "start"]


def start(holder: Any, reactor: Any) -> AuditTrail:
    """Start writing security events from the current config; returns something with stop()."""
    return AuditTrail(holder, reactor).start()
