"""A real rsyslogd for end-to-end tests: TCP, UDP and a Unix socket on loopback, written to one file."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.support import process
from tests.support.daemon import free_port

RSYSLOGD = "/usr/sbin/rsyslogd"

# One line per message: what the receiver parsed out of the syslog header, then the JSON body. The Unix
# socket is read as a host's /dev/log is (imuxsock's own parser: the local syslog(3) format).
_CONFIG = """\
global(workDirectory="{work}" maxMessageSize="64k")
module(load="imtcp")
module(load="imudp")
module(load="imuxsock" SysSock.Use="off")
input(type="imtcp" address="127.0.0.1" port="{tcp}")
input(type="imudp" address="127.0.0.1" port="{udp}")
input(type="imuxsock" Socket="{sock}" CreatePath="on")
template(name="parsed" type="string"
         string="%protocol-version%|%syslogfacility-text%|%syslogseverity-text%|%app-name%|%msgid%|%msg%\\n")
*.* action(type="omfile" file="{out}" template="parsed")
"""


class Rsyslog:
    """`start()` / `stop()` may be called again: the same ports, socket and output file are kept."""

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp / "rsyslog"
        self.dir.mkdir(exist_ok=True)
        self.tcp_port = free_port()
        self.udp_port = _free_udp_port()
        self.socket = str(self.dir / "log.sock")
        self.out = self.dir / "out.log"
        self.pidfile = self.dir / "rsyslogd.pid"
        self.conf = self.dir / "rsyslog.conf"
        self.conf.write_text(_CONFIG.format(work=self.dir, tcp=self.tcp_port, udp=self.udp_port,
                                            sock=self.socket, out=self.out))
        self.proc: subprocess.Popen[bytes] | None = None
        self._holder: Any = None

    def hold_port(self) -> None:
        """While down, keep the TCP port bound (not listening) so no other test's server takes it."""
        import socket

        if self._holder is None:
            self._holder = socket.socket()
            self._holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._holder.bind(("127.0.0.1", self.tcp_port))

    def start(self, timeout: float = 10.0) -> Rsyslog:
        if self._holder is not None:
            self._holder.close()
            self._holder = None
        self.pidfile.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [RSYSLOGD, "-n", "-f", str(self.conf), "-i", str(self.pidfile)],
            stdout=subprocess.DEVNULL, stderr=open(self.dir / "stderr.log", "ab"),
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rsyslogd exited: {(self.dir / 'stderr.log').read_text()}")
            if _listening(self.tcp_port) and os.path.exists(self.socket):
                return self
            time.sleep(0.05)
        raise RuntimeError("rsyslogd did not start listening")

    def stop(self) -> None:
        process.stop(self.proc)
        self.proc = None
        if self._holder is not None:
            self._holder.close()
            self._holder = None

    def lines(self) -> list[list[str]]:
        """Each received message as [version, facility, severity, app-name, msgid, msg]."""
        if not self.out.exists():
            return []
        return [line.split("|", 5) for line in self.out.read_text(errors="replace").splitlines() if line]

    def records(self) -> list[dict[str, Any]]:
        out = []
        for fields in self.lines():
            msg = fields[-1]
            start = msg.find("{")
            if start >= 0:
                try:
                    out.append(json.loads(msg[start:]))
                except ValueError:
                    pass
        return out

    def wait_for(self, predicate: Any, timeout: float = 15.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            records = self.records()
            if predicate(records) or time.monotonic() > deadline:
                return records
            time.sleep(0.05)


def _free_udp_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0
