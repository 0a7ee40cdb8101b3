"""`ccproxy example config|unit|install-script`: the files an operator starts from, as shipped.

They are installed with the package as data files under `<prefix>/share/ccproxy/` (in a venv at
/opt/ccproxy: /opt/ccproxy/share/ccproxy/), from the very files of the source tree
(`etc/ccproxy/config.yaml`, `systemd/ccproxy.service`, `packaging/install.sh`), so there is one copy
to edit. From a checkout they are read where they are.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# name -> (file name once installed, path in the source tree)
EXAMPLES = {
    "config": ("config.yaml", "etc/ccproxy/config.yaml"),
    "unit": ("ccproxy.service", "systemd/ccproxy.service"),
    "install-script": ("install.sh", "packaging/install.sh"),
}


def find(name: str) -> Path:
    installed, in_tree = EXAMPLES[name]
    # A checkout's own files first: there they are the truth, and an installed copy may be older.
    candidates = [Path(__file__).resolve().parents[1] / in_tree,
                  Path(sys.prefix) / "share" / "ccproxy" / installed]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"the example {name} is not installed (looked in {', '.join(map(str, candidates))})")


def command(args: argparse.Namespace) -> int:
    try:
        data = find(args.name).read_bytes()
    except OSError as e:
        print(f"ccproxy example: {e}", file=sys.stderr)
        return 1
    if args.output is None:
        sys.stdout.buffer.write(data)
        return 0
    mode = 0o755 if args.name == "install-script" else 0o644
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if args.force else os.O_EXCL)
    try:
        fd = os.open(args.output, flags, mode)
    except FileExistsError:
        print(f"ccproxy example: {args.output} exists; --force replaces it", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"ccproxy example: cannot write {args.output}: {e.strerror}", file=sys.stderr)
        return 1
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    print(f"wrote {args.output}")
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("example", help="print or write the example config, systemd unit or install script")
    p.add_argument("name", choices=sorted(EXAMPLES))
    p.add_argument("--output", "-o", help="write to this file (default: standard output)")
    p.add_argument("--force", action="store_true", help="replace the file if it exists")
    p.set_defaults(func=command)
