"""The audit trail. Not built yet."""

from __future__ import annotations

from typing import Any


def start(holder: Any, reactor: Any) -> Any:
    """Start writing security events from the current config; returns something with stop()."""
    return None
