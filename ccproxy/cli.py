"""The `ccproxy` command: offline tools beside the daemon (`twistd ccproxy` runs the daemon)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

import yaml

from ccproxy.config import ConfigError, load
from ccproxy.logs import escape

Command = Callable[[argparse.Namespace], int]


def check_config(args: argparse.Namespace) -> int:
    from ccproxy import preflight

    try:
        config = load(args.path)
    except ConfigError as e:
        for fault in e.faults:
            print(f"{args.path}: invalid: {escape(str(fault))}", file=sys.stderr)
        return 1
    # Run as the daemon's user (the unit's ExecStartPre does): files it could not read or write.
    faults = preflight.check(config)
    for fault in faults:
        print(f"{args.path}: unusable: {fault}", file=sys.stderr)
    if faults:
        return 1
    if args.quiet:
        return 0
    from ccproxy.config.privacy import report

    # In the file's own schema, defaults filled in: it can be saved and used as a config file. Secrets
    # appear as the `${VAR}` they came from (their masked values below) or, written in the file, masked.
    print(f"# {args.path}: valid. Effective configuration (secrets masked):")
    print("\n".join(f"# {line}" for line in report(config)))
    for path, masked in config.secrets_shown:
        print(f"# {path}: {escape(masked)}")
    for note in config.notes:  # keys rotated by `ccproxy security rotate-key`
        print(f"# {escape(note)}")
    print(yaml.safe_dump(config.effective(), sort_keys=False, allow_unicode=True), end="")
    return 0


def gen_cert(args: argparse.Namespace) -> int:
    from ccproxy.tls import write_self_signed

    write_self_signed(args.cert, args.key, tuple(args.host))
    print(f"wrote {args.cert} and {args.key} (self-signed, for development only)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ccproxy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check-config", help="validate a config file and print it with secrets masked")
    p.add_argument("path")
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing when the file is valid")
    p.set_defaults(func=check_config)

    p = sub.add_parser("gen-cert", help="write a self-signed certificate for local development")
    p.add_argument("--cert", default="cert.pem")
    p.add_argument("--key", default="key.pem")
    p.add_argument("--host", action="append", default=["localhost", "127.0.0.1", "::1"])
    p.set_defaults(func=gen_cert)

    from ccproxy.audit.cli import add_parser as add_audit_parser
    from ccproxy.audit.privacy.cli import add_parser as add_privacy_parser

    add_audit_parser(sub)
    add_privacy_parser(sub)

    from ccproxy.auth.keygen import add_parser as add_keys_parser
    from ccproxy.examples import add_parser as add_example_parser

    add_keys_parser(sub)
    add_example_parser(sub)
    from ccproxy.admin.cli import add_parser as add_security_parser

    add_security_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Command = args.func
    return func(args)


if __name__ == "__main__":
    sys.exit(main())
