"""The real Claude Code CLI for end-to-end tests: where it is installed, and how to run it.

`.ci/run` installs it (`npm install --prefix DIR @anthropic-ai/claude-code`) into
`$CCPROXY_CLAUDE_CODE_DIR`, by default `~/.cache/ccproxy-test/claude-code` (outside the repository).
When it is missing the test installs it there itself; if that fails, the test fails: it never skips.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

PACKAGE = "@anthropic-ai/claude-code@^2.1"


def install_dir() -> Path:
    default = Path.home() / ".cache" / "ccproxy-test" / "claude-code"
    return Path(os.environ.get("CCPROXY_CLAUDE_CODE_DIR") or default)


def binary() -> Path:
    """The `claude` executable, installed first if it is missing."""
    where = install_dir()
    path = where / "node_modules" / ".bin" / "claude"
    if not path.exists():
        where.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["npm", "install", "--prefix", str(where), PACKAGE], capture_output=True,
                              text=True, timeout=600)
        if done.returncode != 0 or not path.exists():
            raise AssertionError(f"Claude Code is not installed and `npm install {PACKAGE}` failed "
                                 f"(.ci/run installs it):\n{done.stdout}\n{done.stderr}")
    return path


def run(prompt: str, cwd: Path, base_url: str, ca_file: str, home: Path, timeout: float = 180.0,
        extra: list[str] | None = None) -> dict[str, Any]:
    """`claude -p PROMPT --output-format json` against `base_url`; returns the parsed result."""
    home.mkdir(parents=True, exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "ANTHROPIC_BASE_URL": base_url,
        "ANTHROPIC_API_KEY": "sk-ant-api03-e2e-test-key-000000000000000000000000",
        "NODE_EXTRA_CA_CERTS": ca_file,
        "DISABLE_TELEMETRY": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
    }
    args = [str(binary()), "-p", prompt, "--output-format", "json", *(extra or [])]
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    try:
        result: dict[str, Any] = json.loads(done.stdout)
    except ValueError:
        raise AssertionError(f"claude exited {done.returncode}:\n{done.stdout}\n{done.stderr}") from None
    return result
