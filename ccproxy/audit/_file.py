"""The file output: append-only, mode 0600, batched writes, daily (and size) rotation, retention."""

from __future__ import annotations

import datetime
import hashlib
import os
import re
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from ccproxy.audit._loss import LossCounter, Report
from ccproxy.audit._record import NotCanonical, parse_line
from ccproxy.config.audit import FileOutput

log = Logger(namespace="ccproxy.audit")

RunInThread = Callable[[Callable[[], Any]], "defer.Deferred[Any]"]
# (event name, severity, fields): what the sink found wrong with its file, for the trail to record.
Notice = Callable[[str, str, dict[str, Any]], None]
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


Decode = Callable[[bytes], dict[str, Any]]


def last_record(path: str, decode: Decode = parse_line) -> dict[str, Any] | None:
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
            return decode(line)
        except NotCanonical:
            continue
    return None


def first_record(path: str, decode: Decode = parse_line) -> dict[str, Any] | None:
    """The first record of a file (its first line), or None."""
    try:
        with open(path, "rb") as f:
            raw = f.readline(1024 * 1024)
    except OSError:
        return None
    try:
        return decode(raw.rstrip(b"\n"))
    except NotCanonical:
        return None


def first_seq(path: str, decode: Decode = parse_line) -> int | None:
    """The sequence number of the oldest record kept on disk: in the oldest rotated file, else the live one."""
    for candidate in [p for _, p in rotated_files(path)] + [path]:
        record = first_record(candidate, decode)
        if record is not None and isinstance(record.get("seq"), int):
            return int(record["seq"])
    return None


def resume_point(path: str, decode: Decode = parse_line) -> dict[str, Any] | None:
    """The newest record written by an earlier run, in the live file or else the newest rotated one."""
    record = last_record(path, decode)
    if record is None:
        for _, older in reversed(rotated_files(path)):
            record = last_record(older, decode)
            if record is not None:
                break
    return record


class FileSink:
    def __init__(self, spec: FileOutput, clock: Any, run_in_thread: RunInThread,
                 data_retention: float | None = None, report_loss: Report | None = None,
                 notice: Notice | None = None, rotated: Callable[[list[str]], None] | None = None,
                 decode: Decode = parse_line) -> None:
        self.spec = spec
        self.decode = decode  # how this file's lines are read (decrypted, with encryption at rest)
        self.notice: Notice = notice or (lambda name, severity, fields: None)
        # Called after a rotation, with the files retention removed (the trail checkpoints then).
        self.rotated = rotated or (lambda removed: None)
        self.identity: tuple[int, int] = (0, 0)
        self.damage: dict[str, Any] | None = None
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
        self._open()
        self._seal_partial_tail()
        last = last_record(self.spec.path, self.decode)
        self.day = str(last["timestamp"])[:10] if last and isinstance(last.get("timestamp"), str) else day_of(now)
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
        self.check_identity()
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
        # Read too: a crash's half-written last line is looked for at start.
        self.fd = os.open(self.spec.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.fchmod(self.fd, 0o600)
        st = os.fstat(self.fd)
        self.size, self.identity = st.st_size, (st.st_dev, st.st_ino)

    def _seal_partial_tail(self) -> None:
        """A crash mid-write leaves half a record at the end: end its line, and remember what it was.

        The next record then starts on a line of its own, and the trail's first record names the
        damaged bytes (offset, length, SHA-256), which is how verify tells this crash from an edit.
        Nothing is cut: the bytes stay as evidence.
        """
        if not self.size or os.pread(self.fd, 1, self.size - 1) == b"\n":
            return
        start = max(0, self.size - 4 * 1024 * 1024)
        tail = os.pread(self.fd, self.size - start, start)
        cut = tail.rfind(b"\n") + 1
        partial = tail[cut:]
        self._write_all(b"\n")
        try:
            self.decode(partial)
            return  # the record is whole, only its newline was lost
        except NotCanonical:
            pass
        self.damage = {"file": self.spec.path, "offset": start + cut, "partial_bytes": len(partial),
                       "partial_sha256": hashlib.sha256(partial).hexdigest(),
                       "reason": "a record was cut short by a crash while it was written; its line is sealed"}
        log.error("audit file {path}: a partly written record ({n} bytes at offset {offset}) was found and sealed",
                  path=self.spec.path, n=len(partial), offset=start + cut)

    def check_identity(self) -> None:
        """Is our descriptor still the file at our path? If it was deleted or replaced, say so and reopen.

        Otherwise every later record would go to an unlinked file, or a file no one reads.
        """
        if self.fd < 0:
            return
        try:
            st = os.stat(self.spec.path)
        except FileNotFoundError:
            found = "deleted"
        except OSError:
            return
        else:
            if (st.st_dev, st.st_ino) == self.identity:
                return
            found = "replaced by another file"
        old_size = self.size
        self._sync_and_close(self.fd)
        self.fd = -1
        self._open()
        log.critical("audit file {path} was {found} while in use; reopened", path=self.spec.path, found=found)
        self.notice("audit_file_replaced", "critical", {
            "file": self.spec.path, "found": found, "bytes_written_before": old_size,
            "reason": f"the live audit file was {found} under the running daemon; records written to it "
                      "before are no longer at its path"})

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
        self.rotated(self._expire())

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
        self.check_identity()
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
        removed = self._expire()
        if removed:
            self.rotated(removed)

    def _expire(self) -> list[str]:
        removed: list[str] = []
        if self.retention is None:
            return removed
        cutoff = self.clock.seconds() - self.retention
        for day, path in rotated_files(self.spec.path):
            end_of_day = datetime.datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=datetime.UTC).timestamp() + _DAY
            if end_of_day > cutoff:
                break
            try:
                os.remove(path)
                removed.append(path)
                log.info("audit file {path} removed: older than the retention period", path=path)
            except OSError as e:
                log.error("audit file {path} could not be removed: {error}", path=path, error=e.strerror)
        return removed
