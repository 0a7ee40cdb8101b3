"""The daemon's own log, shaped for where it goes: the systemd journal, syslog, or a terminal.

`twistd ccproxy` picks the observer (through twistd's own `--logger` option, which it fills in):

- `journal`: one line per log line on standard output, each starting with its sd-daemon(3) priority
  (`<2>` critical, `<3>` error, `<4>` warning, `<6>` info, `<7>` debug), so journald stores each at
  its priority and forwards it to syslog as such. Chosen by `--log-format journal`, or by `auto` when
  standard output or error is the journal's stream (`$JOURNAL_STREAM` names it, as systemd sets it);
- `syslog` (twistd's `--syslog`): syslog(3) with facility daemon, the priority of each level, and
  the PID (`ccproxy[1234]:`); the ident is twistd's `--prefix` (default `ccproxy`);
- `text`: twistd's usual timestamped lines.

In every one, what a log line carries from outside (a client's header, a key name, a JWT claim, an
upstream's reason phrase) is escaped by `escape`: no C0 or C1 control character, DEL or line
separator reaches an output, so a client cannot forge log lines or drive a terminal.
"""

from __future__ import annotations

import os
import re
import sys
import syslog as _syslog
import time
from collections.abc import Callable
from typing import IO, Any

from twisted.logger import ILogObserver, LogLevel, formatEvent, formatTime
from zope.interface import implementer

# C0 controls, DEL, C1 controls, and Unicode's line and paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")

_JOURNAL = {LogLevel.critical: 2, LogLevel.error: 3, LogLevel.warn: 4, LogLevel.info: 6, LogLevel.debug: 7}
_SYSLOG = {
    LogLevel.critical: _syslog.LOG_CRIT, LogLevel.error: _syslog.LOG_ERR, LogLevel.warn: _syslog.LOG_WARNING,
    LogLevel.info: _syslog.LOG_INFO, LogLevel.debug: _syslog.LOG_DEBUG,
}


def _escape_one(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str) -> str:
    """`text` with every control character written as `\\xNN` (or `\\uNNNN`): safe on one log line."""
    return _CONTROL.sub(_escape_one, text)


def lines(event: dict[str, Any]) -> list[str]:
    """The event's text as log lines, every field escaped; a traceback adds its own lines."""
    safe = {key: escape(value) if isinstance(value, str) and key != "log_format" else value
            for key, value in event.items()}
    text = formatEvent(safe)
    failure = event.get("log_failure")
    if failure is not None:
        try:
            text += "\n" + failure.getTraceback().rstrip("\n")
        except Exception:
            text += "\n(the traceback could not be formatted)"
    return [escape(line) for line in text.split("\n")] or [""]


def level_of(event: dict[str, Any]) -> LogLevel:
    level = event.get("log_level", LogLevel.info)
    return level if level in _JOURNAL else LogLevel.info


@implementer(ILogObserver)
class JournalObserver:
    """sd-daemon priority prefixes on every line, for journald."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def __call__(self, event: dict[str, Any]) -> None:
        prefix = f"<{_JOURNAL[level_of(event)]}>"
        system = event.get("log_system") or event.get("log_namespace") or "-"
        out = lines(event)
        out[0] = f"[{escape(str(system))}] {out[0]}"
        try:
            self.stream.write("".join(f"{prefix}{line}\n" for line in out))
            self.stream.flush()
        except (OSError, ValueError):
            pass  # nowhere left to log to


@implementer(ILogObserver)
class SyslogObserver:
    """syslog(3): facility daemon, the severity of each level, the PID in every message."""

    def __init__(self, ident: str, facility: int = _syslog.LOG_DAEMON,
                 send: Callable[[int, str], None] | None = None) -> None:
        self.facility = facility
        if send is None:
            _syslog.openlog(ident, _syslog.LOG_PID | _syslog.LOG_NDELAY, facility)
            send = _syslog.syslog
        self.send = send

    def __call__(self, event: dict[str, Any]) -> None:
        priority = self.facility | _SYSLOG[level_of(event)]
        system = event.get("log_system") or event.get("log_namespace") or "-"
        out = lines(event)
        out[0] = f"[{escape(str(system))}] {out[0]}"
        for line in out:
            self.send(priority, line)


@implementer(ILogObserver)
class TextObserver:
    """twistd's timestamped lines, escaped."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def __call__(self, event: dict[str, Any]) -> None:
        when = formatTime(event.get("log_time", time.time()))
        system = event.get("log_system") or f"{event.get('log_namespace') or '-'}#{level_of(event).name}"
        out = lines(event)
        text = f"{when} [{escape(str(system))}] {out[0]}\n" + "".join(f"\t{line}\n" for line in out[1:])
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass


def under_journal(environ: dict[str, str] | os._Environ[str] | None = None,
                  streams: tuple[IO[str], ...] = ()) -> bool:
    """Whether standard output or error is the journal's stream (systemd sets `JOURNAL_STREAM=dev:inode`)."""
    env = os.environ if environ is None else environ
    value = env.get("JOURNAL_STREAM", "")
    if ":" not in value:
        return False
    for stream in streams or (sys.stdout, sys.stderr):
        try:
            st = os.fstat(stream.fileno())
        except (OSError, ValueError, AttributeError):
            continue
        if value == f"{st.st_dev}:{st.st_ino}":
            return True
    return False


# What `observer()` builds, chosen by `choose()` while twistd reads its options.
_chosen: tuple[str, str] = ("text", "ccproxy")
FORMATS = ("auto", "journal", "text")


def choose(log_format: str, syslog: bool, prefix: str | None, logfile: str | None = None) -> str:
    """Pick the observer for this run; returns its name (`journal`, `syslog`, `text` or `file`).

    `logfile`: where twistd would write its log (a daemonised twistd, or `--logfile`); None: stdout.
    """
    global _chosen
    if syslog:
        kind, where = "syslog", prefix or "ccproxy"
    elif logfile:
        kind, where = "file", logfile
    elif log_format == "auto":
        kind, where = ("journal" if under_journal() else "text"), ""
    else:
        kind, where = log_format, ""
    _chosen = (kind, where)
    return kind


def observer() -> ILogObserver:
    """The log observer factory twistd calls (`--logger ccproxy.logs.observer`)."""
    kind, where = _chosen
    if kind == "journal":
        return JournalObserver(sys.stdout)
    if kind == "syslog":
        return SyslogObserver(where)
    if kind == "file":
        from twisted.python.logfile import LogFile

        return TextObserver(LogFile.fromFullPath(where))
    return TextObserver(sys.stdout)
