"""Ending the processes the tests start (the daemon, rsyslogd)."""

from __future__ import annotations

import signal
import subprocess


def stop(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> int:
    """SIGTERM, then SIGKILL if the process has not exited within `timeout`; its exit code."""
    if proc is None:
        return 0
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
