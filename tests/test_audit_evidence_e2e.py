"""The evidence work with the real daemon: a tail cut while it was stopped, a kill -9 mid-write, its
live file deleted under it, and `ccproxy audit checkpoint` and `verify` as an operator runs them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support.daemon import Daemon

HMAC_KEY = "evidence-e2e-hmac-key-0a1b2c3d4e5f60718293"
ENV = {"CCPROXY_AUDIT_HMAC_KEY": HMAC_KEY}


def _config(tmp: Path) -> dict[str, Any]:
    return {"security": {"audit": {"hmac_key": "${CCPROXY_AUDIT_HMAC_KEY}", "outputs": [
        {"type": "file", "path": str(tmp / "audit.log"), "flush_interval": "20ms"}]}}}


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ccproxy.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **ENV, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
                          timeout=60)


def _records(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_bytes().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _wait(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _reload(d: Daemon, n: int) -> None:
    for i in range(n):
        config = d.config
        config.setdefault("upstreams", {}).setdefault("anthropic", {})["read_timeout"] = f"{600 + i}s"
        assert "config reloaded" in d.reload(config)


def _started(daemon: Any) -> Daemon:
    """A daemon whose audit file lives in its own directory (known only once it is made)."""
    d: Daemon = daemon({}, env=ENV)
    d.stop()
    d.config["security"] = _config(d.tmp)["security"]
    return d.start()


def _files(d: Daemon) -> list[str]:
    return sorted(str(p) for p in d.tmp.glob("audit.log*"))


def test_a_tail_cut_while_stopped_fails_verify_for_ever_and_the_restart_says_so(daemon: Any) -> None:
    d = _started(daemon)
    _reload(d, 4)
    d.stop()
    audit = d.tmp / "audit.log"
    assert _cli("audit", "verify", *_files(d)).returncode == 0
    lines = audit.read_bytes().splitlines(keepends=True)
    audit.write_bytes(b"".join(lines[:-2]))
    cut = _cli("audit", "verify", *_files(d))
    assert cut.returncode == 1 and "is older than the last checkpoint" in cut.stderr
    d.start()
    _wait(lambda: any(r["event"] == "audit_records_missing" for r in _records(audit)))
    d.stop()
    [notice] = [r for r in _records(audit) if r["event"] == "audit_records_missing"]
    assert notice["reason"].startswith(f"records after seq {len(lines) - 2} are missing: the last checkpoint")
    after = _cli("audit", "verify", *_files(d))
    assert after.returncode == 1 and "removed (the next record found is seq" in after.stderr, after.stderr


def test_kill_9_mid_write_is_sealed_at_restart_and_verify_passes(daemon: Any) -> None:
    d = _started(daemon)
    _reload(d, 3)
    audit = d.tmp / "audit.log"
    _wait(lambda: len(_records(audit)) >= 3)
    assert d.proc is not None
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    data = audit.read_bytes()
    audit.write_bytes(data + data.splitlines(keepends=True)[-1][:40])  # what a write cut by the kill leaves
    d.start()
    _reload(d, 1)
    d.stop()
    result = _cli("audit", "verify", *_files(d))
    assert result.returncode == 0, result.stderr
    assert "1 lines cut short by a crash, sealed by the record after them" in result.stdout
    damaged = [r for r in _records(audit) if r["event"] == "audit_file_damaged"]
    assert damaged and damaged[0]["partial_bytes"] == 40 and damaged[0]["offset"] == len(data)


def test_the_live_file_deleted_under_the_daemon_is_reported_and_checkpoint_works_while_running(
        daemon: Any) -> None:
    d = _started(daemon)
    _reload(d, 2)
    audit = d.tmp / "audit.log"
    _wait(lambda: len(_records(audit)) >= 2)
    result = _cli("audit", "checkpoint", "--config", str(d.config_path))
    assert result.returncode == 0, result.stderr
    assert "checkpoint seq 2 (hmac-sha256)" in result.stdout
    os.remove(audit)
    _wait(lambda: audit.exists() and any(r["event"] == "audit_file_replaced" for r in _records(audit)))
    [notice] = _records(audit)
    assert notice["found"] == "deleted" and notice["severity"] == "critical" and notice["seq"] == 3
    assert "audit file" in d.log() and "was deleted while in use; reopened" in d.log()
    d.stop()
    missing = _cli("audit", "verify", *_files(d))
    assert missing.returncode == 1
    assert missing.stderr.startswith("records seq 1 to 2 are missing: the checkpoint of"), missing.stderr
