"""Start the real daemon (`twistd -n ccproxy`) in a subprocess, for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from tests.support import process

ROOT = Path(__file__).resolve().parents[2]
# twistd as its script runs it. When the test run is measured (COVERAGE_PROCESS_START, see
# [tool.coverage] in pyproject.toml), coverage starts in the daemon at interpreter start-up; its data
# is saved once the reactor has shut down, because twistd ends by re-sending itself the signal that
# stopped it (SIGTERM, default action), so no exit hook would run.
TWISTD = """\
import sys
from twisted.scripts.twistd import run

try:
    import coverage
except ImportError:
    coverage = None
measured = coverage.Coverage.current() if coverage is not None else None
if measured is not None:
    from twisted.internet import reactor

    def save():
        measured.stop()
        measured.save()

    reactor.addSystemEventTrigger("after", "shutdown", save)
sys.argv[0] = "twistd"
run()
"""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class Daemon:
    """One ccproxy process. `config` is the YAML as a dict; host/port are filled in if absent."""

    def __init__(self, tmp: Path, config: dict[str, Any], env: dict[str, str] | None = None,
                 ca_file: str | None = None) -> None:
        self.tmp = tmp
        self.config = config
        server = config.setdefault("server", {})
        server.setdefault("host", "127.0.0.1")
        server.setdefault("port", free_port(server["host"]))
        self.host, self.port = server["host"], server["port"]
        # The admin socket and incident state of this daemon alone (not /run/ccproxy, /var/lib/ccproxy).
        admin = config.setdefault("admin", {})
        if isinstance(admin, dict):
            admin.setdefault("socket", str(tmp / "admin.sock"))
            admin.setdefault("state_dir", str(tmp / "state"))
        self.admin_socket = admin.get("socket") if isinstance(admin, dict) else None
        self.tls = server.get("tls", {}).get("enabled", True)
        self.ca_file = ca_file
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        self.config_path = tmp / "config.yaml"
        self.log_path = tmp / f"ccproxy-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        # How the interpreter is started (a launcher may stand before it) and descriptors it inherits.
        self.prefix: list[str] = [sys.executable]
        self.pass_fds: tuple[int, ...] = ()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def write_config(self, config: dict[str, Any] | None = None) -> None:
        if config is not None:
            self.config = config
        self.config_path.write_text(yaml.safe_dump(self.config))

    def start(self, timeout: float = 20.0) -> Daemon:
        self.write_config()
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*self.prefix, "-c", TWISTD, "-n", "--pidfile=", "ccproxy", "--config", str(self.config_path)],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, pass_fds=self.pass_fds,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ccproxy exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.get("/ready").status == 200:
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"ccproxy did not become ready:\n{self.log()}")

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if self.ca_file is None:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def get(self, path: str) -> Any:
        req = urllib.request.Request(self.url + path)
        try:
            return urllib.request.urlopen(req, timeout=5, context=self.ssl_context() if self.tls else None)
        except urllib.error.HTTPError as e:
            return e

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def reload(self, config: dict[str, Any] | str, timeout: float = 10.0) -> str:
        """Rewrite the config file, send SIGHUP, and return the log line that answered it."""
        if isinstance(config, str):
            self.config_path.write_text(config)
        else:
            self.write_config(config)
        seen = self.log().count("config reload")
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = [line for line in self.log().splitlines() if "config reload" in line]
            if len(lines) > seen:
                return lines[-1]
            time.sleep(0.05)
        raise AssertionError(f"no reload answer in the log:\n{self.log()}")

    def stop(self) -> int:
        return process.stop(self.proc)
