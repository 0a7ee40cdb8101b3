"""The daemon's log on each host: journal priority prefixes, syslog facility/severity/PID, escaping of
what came from outside, the syslog audit output's local format and its once-per-outage messages."""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import syslog
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger, LogLevel, globalLogPublisher
from twisted.python.failure import Failure

from ccproxy import logs
from ccproxy.audit._syslog import SyslogSink, format_local
from ccproxy.config.audit import FACILITIES, SyslogOutput
from tests.support.daemon import Daemon


def _event(level: LogLevel, text: str, **fields: Any) -> dict[str, Any]:
    return {"log_level": level, "log_format": text, "log_namespace": "ccproxy.test", "log_time": 0.0, **fields}


def test_escape_writes_every_control_character_visibly() -> None:
    assert logs.escape("a\r\x1b[2Kb\x85\x9b\x00\x7f\u2028c\td") == "a\\x0d\\x1b[2Kb\\x85\\x9b\\x00\\x7f\\u2028c\\x09d"
    assert logs.escape("plain é ü ✓") == "plain é ü ✓"


def test_journal_lines_carry_the_priority_of_their_level() -> None:
    out = io.StringIO()
    observer = logs.JournalObserver(out)
    for level in (LogLevel.debug, LogLevel.info, LogLevel.warn, LogLevel.error, LogLevel.critical):
        observer(_event(level, "x {n}", n=level.name))
    assert [line[:3] for line in out.getvalue().splitlines()] == ["<7>", "<6>", "<4>", "<3>", "<2>"]
    assert out.getvalue().splitlines()[2] == "<4>[ccproxy.test] x warn"


def test_a_traceback_keeps_its_lines_each_with_the_priority() -> None:
    out = io.StringIO()
    try:
        raise ValueError("bad\x1b[31m")
    except ValueError:
        failure = Failure()
    logs.JournalObserver(out)(_event(LogLevel.critical, "it failed", log_failure=failure))
    lines = out.getvalue().splitlines()
    assert len(lines) > 3 and all(line.startswith("<2>") for line in lines)
    assert "ValueError: bad\\x1b[31m" in lines[-1]


def test_client_bytes_in_fields_cannot_forge_a_line_or_reach_a_terminal() -> None:
    hostile = "key-\x85\x9b\r\n<3>[ccproxy] forged\x1b[2K"
    for make in (logs.JournalObserver, logs.TextObserver):
        out = io.StringIO()
        make(out)(_event(LogLevel.warn, "authentication_failure sub={sub}", sub=hostile))
        text = out.getvalue()
        assert text.count("\n") == 1, text
        assert not re.search("[\x00-\x08\x0b-\x1f\x7f-\x9f]", text)
        assert "\\x85\\x9b\\x0d\\x0a<3>[ccproxy] forged\\x1b[2K" in text


def test_syslog_uses_facility_daemon_and_the_severity_of_each_level() -> None:
    sent: list[tuple[int, str]] = []
    observer = logs.SyslogObserver("ccproxy", send=lambda priority, line: sent.append((priority, line)))
    for level in (LogLevel.info, LogLevel.warn, LogLevel.error, LogLevel.critical):
        observer(_event(level, "m"))
    assert [p for p, _ in sent] == [syslog.LOG_DAEMON | s for s in
                                     (syslog.LOG_INFO, syslog.LOG_WARNING, syslog.LOG_ERR, syslog.LOG_CRIT)]


def test_journal_is_chosen_when_stdout_is_the_journal_stream(tmp_path: Path) -> None:
    path = tmp_path / "stream"
    with open(path, "w") as f:
        st = os.fstat(f.fileno())
        assert logs.under_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, (f,))
        assert not logs.under_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}, (f,))
        assert not logs.under_journal({}, (f,))


def test_the_daemon_under_systemd_writes_priority_prefixed_lines(tmp_path: Path) -> None:
    d = Daemon(tmp_path, {"server": {"tls": {"enabled": False}}, "security": {"auth": {
        "enabled": True, "api_keys": [{"id": "key-1", "key": "ccp-test-client-key-0123456789abcdef"}]}}})
    d.log_path.touch()
    st = os.stat(d.log_path)
    d.env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    d.start()
    with socket.create_connection((d.host, d.port), timeout=5) as sock:
        # An unknown key whose last characters (shown by the key mask) are C1 controls.
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nx-api-key: sk-ant-api03-ABCDEFGHIJKLMNOP\x85\x9b\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 401 ")
    assert d.stop() == -signal.SIGTERM
    lines = d.log().splitlines()
    assert lines and all(re.match(r"<[2-7]>", line) for line in lines), lines
    assert any(line.startswith("<4>") and "TLS is disabled" in line for line in lines)
    assert any(line.startswith("<6>") and "ccproxy listening on" in line for line in lines)
    failure = [line for line in lines if "authentication_failure" in line]
    assert failure and failure[0].startswith("<4>") and "\\x85\\x9b" in failure[0], lines
    assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f]", d.log())


def test_local_socket_format_is_what_syslog3_writes() -> None:
    spec = SyslogOutput(host="/dev/log", port=0, protocol="unix", facility=FACILITIES["local4"], app_name="ccproxy")
    message = format_local({"severity": "warning"}, b'{"seq":1}\n', spec, 4242, 1_700_000_000.0)
    match = re.match(rb"^<(\d+)>([A-Z][a-z]{2}) ([ \d]\d) (\d\d:\d\d:\d\d) ccproxy\[4242\]: \{\"seq\":1\}$", message)
    assert match is not None, message
    assert int(match.group(1)) == 20 * 8 + 4
    assert match.group(2).decode() in ("Nov", "Dec")  # 2023-11-14 or -15, whatever the local zone


def _audit_lines() -> tuple[list[str], Callable[[], None]]:
    seen: list[str] = []

    def observer(event: dict[str, Any]) -> None:
        if event.get("log_namespace") in ("ccproxy.audit",) or "factory" in str(event.get("log_format", "")) \
                or "Scheduling retry" in str(event.get("log_format", "")):
            seen.append(str(event.get("log_format")))

    globalLogPublisher.addObserver(observer)
    return seen, lambda: globalLogPublisher.removeObserver(observer)


def test_a_tcp_receiver_down_is_logged_once_and_its_return_once(tmp_path: Path) -> None:
    reactor = MemoryReactorClock()
    spec = SyslogOutput(host="127.0.0.1", port=514, protocol="tcp", spool_path=str(tmp_path / "spool"))
    seen, done = _audit_lines()
    try:
        sink = SyslogSink(spec, reactor, lambda count, output: None)
        sink.start()
        for _ in range(20):  # twenty failed attempts, a minute and more of retries
            _, _, factory, _, _ = reactor.tcpClients[-1]
            factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
            reactor.advance(6.0)
        assert len(reactor.tcpClients) >= 20
        _, _, factory, _, _ = reactor.tcpClients[-1]
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 514))
        protocol.makeConnection(StringTransport())
        protocol.connectionLost(Failure(ConnectionLost()))
        reactor.advance(6.0)
        _, _, factory, _, _ = reactor.tcpClients[-1]
        factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 514)).makeConnection(StringTransport())
        sink.stop()
    finally:
        done()
    assert len(seen) == 4, seen
    assert "unreachable" in seen[0] and "back" in seen[1] and "unreachable" in seen[2] and "back" in seen[3]


def test_logger_events_reach_the_observer_escaped() -> None:
    out = io.StringIO()
    observer = logs.JournalObserver(out)
    Logger(observer=observer).info("jwt sub={sub}", sub="\r\x1b[2Kroot")
    assert out.getvalue() == "<6>[tests.test_logs] jwt sub=\\x0d\\x1b[2Kroot\n"


def test_twistd_syslog_lines_have_facility_daemon_their_severity_and_the_pid(tmp_path: Path) -> None:
    """`twistd --syslog --prefix=ccproxy`, with a datagram socket of the test's standing in for /dev/log
    (bind-mounted there in a private mount namespace, over an overlay of /dev: the host's is untouched)."""
    import subprocess
    import sys
    import time

    from tests.support.daemon import ROOT, TWISTD, free_port

    if os.geteuid() != 0:
        if os.environ.get("CI"):
            raise AssertionError("needs root (a mount namespace), and CI runs as root")
        import pytest

        pytest.skip("needs root: mounts in a private namespace")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(tmp_path / "log.sock"))
    receiver.settimeout(20)
    port = free_port()
    config = tmp_path / "config.yaml"
    config.write_text(f"server:\n  port: {port}\n  tls:\n    enabled: false\n")
    work = tmp_path / "dev"
    script = "\n".join([
        "set -e",
        f'mkdir -p "{work}/ov" "{work}/dev"',
        f'mount -t tmpfs tmpfs "{work}/ov" && mkdir "{work}/ov/u" "{work}/ov/w"',
        f'mount -t overlay overlay -o "lowerdir=/dev,upperdir={work}/ov/u,workdir={work}/ov/w" "{work}/dev"',
        f'touch "{work}/dev/log" && mount --bind "{tmp_path}/log.sock" "{work}/dev/log"',
        f'mount --move "{work}/dev" /dev',
        'exec "$@"',
    ])
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                             sys.executable, "-c", TWISTD, "-n", "--pidfile=", "--syslog", "--prefix=ccproxy",
                             "ccproxy", "--config", str(config)],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        messages: list[bytes] = []
        deadline = time.monotonic() + 30
        while not any(b"ccproxy listening" in m for m in messages) and time.monotonic() < deadline:
            messages.append(receiver.recv(65536))
        config.write_text("server: [broken\n")
        proc.send_signal(signal.SIGHUP)
        while not any(b"config reload refused" in m for m in messages) and time.monotonic() < deadline:
            try:
                messages.append(receiver.recv(65536))
            except TimeoutError:
                raise AssertionError(messages) from None
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=30)[0].decode()
        receiver.close()
    parsed = [re.match(rb"^<(\d+)>[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d ccproxy\[(\d+)\]: (.*)$", m, re.S)
              for m in messages]
    assert all(parsed), (messages, out)
    by_text = {p.group(3): (int(p.group(1)), int(p.group(2))) for p in parsed if p}
    assert {pid for _, pid in by_text.values()} == {proc.pid}

    def pri(fragment: bytes) -> int:
        return next(p for text, (p, _) in by_text.items() if fragment in text)

    daemon = 3 * 8
    assert pri(b"ccproxy listening") == daemon + 6  # info
    assert pri(b"TLS is disabled") == daemon + 4  # warning
    assert pri(b"config reload refused") == daemon + 3  # err


def test_twistd_logfile_gets_the_escaped_text_lines(tmp_path: Path) -> None:
    import subprocess
    import sys
    import time

    from tests.support.daemon import ROOT, TWISTD, free_port

    config = tmp_path / "config.yaml"
    config.write_text(f"server:\n  port: {free_port()}\n  tls:\n    enabled: false\n")
    logfile = tmp_path / "ccproxy.log"
    proc = subprocess.Popen([sys.executable, "-c", TWISTD, "-n", "--pidfile=", "--logfile", str(logfile),
                             "ccproxy", "--config", str(config)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not (logfile.exists() and "ccproxy listening" in logfile.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    lines = logfile.read_text().splitlines()
    assert any(re.match(r"^\d{4}-\d\d-\d\dT\S+ \[ccproxy\.service#warn\] TLS is disabled", line) for line in lines), lines
