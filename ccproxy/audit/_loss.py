"""Records an output had to drop: counted, and reported as an event of their own, never silently."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall

Report = Callable[[int, str], None]
REPORT_DELAY = 10.0


class LossCounter:
    """Reports at most once per REPORT_DELAY, so a failing output cannot flood the trail with reports."""

    def __init__(self, clock: Any, output: str, report: Report) -> None:
        self.clock = clock
        self.output = output
        self.report = report
        self.lost = 0
        self._unreported = 0
        self._call: IDelayedCall | None = None
        self._stopped = False

    def add(self, count: int) -> None:
        self.lost += count
        self._unreported += count
        if self._call is None and not self._stopped:
            self._call = self.clock.callLater(REPORT_DELAY, self._fire)

    def stop(self) -> None:
        self._stopped = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _fire(self) -> None:
        self._call = None
        count, self._unreported = self._unreported, 0
        if count:
            self.report(count, self.output)
