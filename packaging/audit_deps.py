"""Check the locked runtime dependencies (packaging/requirements.lock) for known vulnerabilities.

    python packaging/audit_deps.py [LOCKFILE]

Runs pip-audit on the lock, against PyPI's vulnerability data. Exit 1 when a vulnerability is
known for a pinned version: CI fails. Exit 0 otherwise, also (with a loud warning) when the
vulnerability data cannot be had: a machine that cannot reach the service, or versions the service
does not know, prove nothing either way, and a network fault must not turn CI red. What was not
audited, and why, is printed every time.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

LOCK = Path(__file__).resolve().parent / "requirements.lock"


def main(argv: list[str]) -> int:
    lock = Path(argv[0]) if argv else LOCK
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "audit.json"
        # --no-deps: the lock is complete; --disable-pip: nothing is installed to find out.
        run = subprocess.run([sys.executable, "-m", "pip_audit", "--requirement", str(lock), "--no-deps",
                              "--disable-pip", "--progress-spinner", "off", "--format", "json",
                              "--output", str(out)], capture_output=True, text=True, timeout=600)
        report = json.loads(out.read_text()) if out.exists() and out.stat().st_size else None
    if report is None:
        print("pip-audit: WARNING: no result, the vulnerability data could not be had; not failing on that:\n"
              + (run.stderr.strip() or run.stdout.strip()), file=sys.stderr)
        return 0
    found = [(d["name"], d.get("version"), v["id"], v.get("fix_versions") or [])
             for d in report.get("dependencies", []) for v in d.get("vulns", [])]
    skipped = [(d["name"], d.get("skip_reason", "")) for d in report.get("dependencies", []) if d.get("skip_reason")]
    audited = len(report.get("dependencies", [])) - len(skipped)
    for name, version, vuln, fixes in found:
        print(f"pip-audit: {name} {version}: {vuln} (fixed in: {', '.join(fixes) or 'no release yet'})")
    if skipped:
        print(f"pip-audit: WARNING: {len(skipped)} of {len(skipped) + audited} locked packages could not be "
              f"audited (the vulnerability service does not know them):", file=sys.stderr)
        for name, reason in skipped:
            print(f"  {name}: {reason}", file=sys.stderr)
    print(f"pip-audit: {audited} package(s) audited, {len(found)} known vulnerabilit{'y' if len(found) == 1 else 'ies'}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
