"""The file output: append-only, mode 0600, batched writes, daily (and size) rotation, retention."""

from __future__ import annotations

import datetime
import json
import os
import re
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from ccproxy.audit._loss import LossCounter, Report
from ccproxy.config.audit import FileOutput

log = Logger(namespace="ccproxy.audit")

RunInThread = Callable[[Callable[[], Any]], "defer.Deferred[Any]"]
_BATCH_LIMIT = 256 * 1024
_HOUSEKEEPING = 3600.0
_DAY = 86400.0


_last_day: list[Any] = [None, ""]  # called per record: format each UTC day once


def day_of(seconds: float) -> str:
    number = int(seconds // _DAY)
    if _last_day[0] != number:
        _last_day[0], _last_day[1] = number, datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%d")
    return str(_last_day[1])


def rotated_files(path: str) -> list[tuple[str, str]]:
    """(day, full path) of every rotated file of `path`, oldest first."""
    directory, base = os.path.split(path)
    pattern = re.compile(re.escape(base) + r"\.(\d{4}-\d{2}-\d{2})(?:\.(\d+))?$")
    found = []
    try:
        names = os.listdir(directory or ".")
    except OSError:
        return []
    for name in names:
        match = pattern.match(name)
        if match:
            found.append((match.group(1), int(match.group(2) or 0), os.path.join(directory, name)))
    found.sort()
    return [(day, full) for day, _, full in found]


def last_record(path: str) -> dict[str, Any] | None:
    """The last complete JSON record of a file, read from its tail."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - 65536))
            tail = f.read()
    except OSError:
        return None
    for line in reversed(tail.split(b"\n")):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            return record
    return None


def resume_point(path: str) -> dict[str, Any] | None:
    """The newest record written by an earlier run, in the live file or else the newest rotated one."""
    record = last_record(path)
    if record is None:
        for _, older in reversed(rotated_files(path)):
            record = last_record(older)
            if record is not None:
                break
    return record


class FileSink:
    def __init__(self, spec: FileOutput, clock: Any, run_in_thread: RunInThread,
                 data_retention: float | None = None, report_loss: Report | None = None) -> None:
        self.spec = spec
        self.clock = clock
        self.run_in_thread = run_in_thread
        retentions = [r for r in (spec.retention, data_retention) if r is not None]
        self.retention = min(retentions) if retentions else None
        self.buffer: list[bytes] = []
        self.buffered = 0
        self.fd = -1
        self.size = 0
        self.day = ""
        self.dirty = False
        self.syncing = False
        self.losses = LossCounter(clock, f"file {spec.path}", report_loss or (lambda count, output: None))
        self._flush_call: IDelayedCall | None = None
        self._sync_call: IDelayedCall | None = None
        self._house_call: IDelayedCall | None = None

    def start(self) -> None:
        now = self.clock.seconds()
        os.makedirs(os.path.dirname(self.spec.path) or ".", mode=0o700, exist_ok=True)
        last = last_record(self.spec.path)
        self.day = str(last["timestamp"])[:10] if last and isinstance(last.get("timestamp"), str) else day_of(now)
        self._open()
        if self.size and self.day != day_of(now):
            self._rotate()
            self.day = day_of(now)
        self._housekeeping()
        self._sync_call = self.clock.callLater(self.spec.sync_interval, self._sync_tick)

    def write(self, line: bytes, now: float) -> None:
        today = day_of(now)
        if today != self.day:
            self.flush()
            if self.size:
                self._rotate()
            self.day = today
        self.buffer.append(line)
        self.buffered += len(line)
        if self.buffered >= _BATCH_LIMIT:
            self.flush()
        elif self._flush_call is None:
            self._flush_call = self.clock.callLater(self.spec.flush_interval, self.flush)

    def flush(self) -> None:
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        if not self.buffer:
            return
        data = b"".join(self.buffer)
        count = len(self.buffer)
        self.buffer, self.buffered = [], 0
        if self.spec.max_size and self.size and self.size + len(data) > self.spec.max_size:
            self._rotate()
        try:
            self._write_all(data)
        except OSError as e:
            self.losses.add(count)
            log.error("audit file {path}: {count} records could not be written: {error}",
                      path=self.spec.path, count=count, error=e.strerror)

    def stop(self) -> defer.Deferred[None]:
        for call in (self._flush_call, self._sync_call, self._house_call):
            if call is not None and call.active():
                call.cancel()
        self._flush_call = self._sync_call = self._house_call = None
        self.flush()
        self.losses.stop()
        if self.fd >= 0:
            try:
                os.fsync(self.fd)  # at shutdown only: the reactor has nothing else to do
            finally:
                os.close(self.fd)
                self.fd = -1
        return defer.succeed(None)

    def _open(self) -> None:
        self.fd = os.open(self.spec.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.fchmod(self.fd, 0o600)
        self.size = os.fstat(self.fd).st_size

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
            self.size += n
        self.dirty = True

    def _rotate(self) -> None:
        """Move the live file aside under its day's name and start a new one."""
        target = f"{self.spec.path}.{self.day}"
        n = 0
        while os.path.exists(target):
            n += 1
            target = f"{self.spec.path}.{self.day}.{n}"
        old = self.fd
        self._sync_and_close(old)
        os.rename(self.spec.path, target)
        self._open()
        self._expire()

    def _sync_and_close(self, fd: int) -> None:
        def work() -> None:
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

        self.dirty = False
        self.run_in_thread(work).addErrback(lambda f: log.failure("audit file sync", f))

    def _sync_tick(self) -> None:
        self._sync_call = self.clock.callLater(self.spec.sync_interval, self._sync_tick)
        if not self.dirty or self.syncing or self.fd < 0:
            return
        self.dirty, self.syncing = False, True
        fd = os.dup(self.fd)  # the live fd may be rotated away while the thread syncs

        def work() -> None:
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

        def done(result: Any) -> Any:
            self.syncing = False
            return result

        self.run_in_thread(work).addBoth(done).addErrback(lambda f: log.failure("audit file sync", f))

    def _housekeeping(self) -> None:
        """Hourly: rotate a file left from an earlier day even when nothing is written, and expire."""
        self._house_call = self.clock.callLater(_HOUSEKEEPING, self._housekeeping)
        now = self.clock.seconds()
        if day_of(now) != self.day:
            self.flush()
            if self.size:
                self._rotate()
            self.day = day_of(now)
        self._expire()

    def _expire(self) -> None:
        if self.retention is None:
            return
        cutoff = self.clock.seconds() - self.retention
        for day, path in rotated_files(self.spec.path):
            end_of_day = datetime.datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=datetime.UTC).timestamp() + _DAY
            if end_of_day > cutoff:
                break
            try:
                os.remove(path)
                log.info("audit file {path} removed: older than the retention period", path=path)
            except OSError as e:
                log.error("audit file {path} could not be removed: {error}", path=path, error=e.strerror)
