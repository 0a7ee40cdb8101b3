"""The real `ccproxy security` command, run against a test daemon's admin socket."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from tests.support.daemon import ROOT, Daemon


def security(d: Daemon, *args: str, socket: str | None = None, as_json: bool = False) -> subprocess.CompletedProcess[str]:
    """`ccproxy security --config <the daemon's config> [--json] ARGS...` (or --socket PATH)."""
    where = ["--socket", socket] if socket else ["--config", str(d.config_path)]
    return subprocess.run(
        [sys.executable, "-m", "ccproxy.cli", "security", *where, *(["--json"] if as_json else []), *args],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=30,
    )


def security_json(d: Daemon, *args: str) -> Any:
    done = security(d, *args, as_json=True)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)
