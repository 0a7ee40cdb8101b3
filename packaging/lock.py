"""Write packaging/requirements.lock: the exact runtime dependencies of ccproxy, as pip resolves them.

    python packaging/lock.py

The lock pins what packaging/install.sh and the Dockerfile install (as pip constraints) and is what
`.ci/run` checks with pip-audit for known vulnerabilities. Run it again after changing the
dependencies in pyproject.toml, or to take newer releases.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "packaging" / "requirements.lock"


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed",
                        "--report", str(report), str(ROOT)], check=True)
        installs = json.loads(report.read_text())["install"]
    pins = sorted((i["metadata"]["name"], i["metadata"]["version"]) for i in installs
                  if i["metadata"]["name"].lower() != "ccproxy")
    lines = ["# ccproxy's runtime dependencies, pinned: written by `python packaging/lock.py`.",
             *(f"{name}=={version}" for name, version in sorted(pins, key=lambda p: p[0].lower()))]
    LOCK.write_text("\n".join(lines) + "\n")
    print(f"wrote {LOCK} ({len(pins)} packages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
