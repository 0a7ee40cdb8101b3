"""Waiting for an event in another process (a log line, a socket state, a file's content).

A test waits for the event it measures, with a deadline far beyond the configured value, so a slow
runner makes it slower, never wrong. The deadline only bounds a test whose event never comes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

POLL = 0.02


def wait_until(predicate: Callable[[], T], timeout: float = 20.0, what: str = "the condition") -> T:
    """Poll `predicate` until it returns something true, and return that; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(POLL)


def wait_steady(read: Callable[[], T], steady: float = 1.0, timeout: float = 60.0, what: str = "a value") -> T:
    """Poll `read` until its value has not changed for `steady` seconds, and return that value."""
    deadline = time.monotonic() + timeout
    value = read()
    since = time.monotonic()
    while time.monotonic() - since < steady:
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} still changing after {timeout}s (last: {value!r})")
        time.sleep(POLL)
        now = read()
        if now != value:
            value, since = now, time.monotonic()
    return value

