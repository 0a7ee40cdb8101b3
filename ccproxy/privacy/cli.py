"""`ccproxy privacy ...`: erase a subject, export a subject's records, rotate the master key."""

from __future__ import annotations

from typing import Any


def add_parser(sub: Any) -> None:
    return None
