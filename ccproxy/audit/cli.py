"""`ccproxy audit ...`: verify files, write a checkpoint on demand, make a checkpoint signing key."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from ccproxy.audit import _checkpoint
from ccproxy.audit._file import first_seq, resume_point, rotated_files
from ccproxy.audit.verify import verify


def add_parser(sub: Any) -> None:
    p = sub.add_parser("audit", help="audit trail tools")
    audit_sub = p.add_subparsers(dest="audit_command", required=True)

    p = audit_sub.add_parser("verify", help="check the hash chain of audit files (rotated ones too) and checkpoints")
    p.add_argument("files", nargs="+", metavar="FILE",
                   help="audit files in any order; checkpoint files among them are used as checkpoints")
    p.add_argument("--key-env", default="CCPROXY_AUDIT_HMAC_KEY",
                   help="environment variable holding the HMAC key the records were sealed with")
    p.add_argument("--public-key", metavar="PEM", help="Ed25519 key (public, or the private one) of the checkpoints")
    p.add_argument("--received", action="store_true",
                   help="files written by a syslog receiver: each line's record starts at its first '{'")
    p.add_argument("--config", metavar="PATH",
                   help="the daemon's config: its key store's file key reads files encrypted at rest")
    p.set_defaults(func=cmd_verify)

    p = audit_sub.add_parser("checkpoint", help="verify each file output's chain, then sign its head to its "
                                                "checkpoint file (works while the daemon runs)")
    p.add_argument("--config", required=True, metavar="PATH")
    p.set_defaults(func=cmd_checkpoint)

    p = audit_sub.add_parser("gen-signing-key", help="write a new Ed25519 key for checkpoints; print its public half")
    p.add_argument("path")
    p.set_defaults(func=cmd_gen_key)


def _env_key(name: str) -> bytes | None:
    return os.environ.get(name, "").encode() or None


def cmd_verify(args: argparse.Namespace) -> int:
    public = None
    if args.public_key:
        try:
            public = _checkpoint.load_public_key(args.public_key)
        except (OSError, ValueError) as e:
            print(f"--public-key: {e}", file=sys.stderr)
            return 2
    key = _env_key(args.key_env)
    decode, problem = _decoder(args.config)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    try:
        report = verify(args.files, key, public, received=args.received, decode=decode)
    except OSError as e:
        print(f"{e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    print(report.message, file=sys.stdout if report.ok else sys.stderr)
    return 0 if report.ok else 1


def _decoder(config_path: str | None) -> tuple[Any, str]:
    """How to read a line: as it is, or decrypted with the file key of the config's key store."""
    from ccproxy.audit.privacy import at_rest_decoder, plain_decode

    if not config_path:
        return plain_decode, ""
    from ccproxy.config import ConfigError, load

    try:
        config = load(config_path)
    except ConfigError as e:
        return None, f"{config_path}: invalid: {e}"
    return at_rest_decoder(config)


def cmd_checkpoint(args: argparse.Namespace) -> int:
    """Sign the head of the chain on disk, as the daemon does, after verifying it.

    It reads the files rather than asking the daemon: the daemon flushes every flush_interval, and
    a checkpoint of what is on disk is what a later verify compares with. A chain that does not
    verify is not signed: that would make the damage look accepted.
    """
    from ccproxy.config import ConfigError, load
    from ccproxy.config.audit import FileOutput

    try:
        config = load(args.config)
    except ConfigError as e:
        print(f"{args.config}: invalid: {e}", file=sys.stderr)
        return 1
    audit = config.audit
    outputs = [o for o in audit.outputs if isinstance(o, FileOutput)] if audit.enabled else []
    if not outputs:
        print("no audit file output is configured: nothing to checkpoint", file=sys.stderr)
        return 1
    key = audit.hmac_key.reveal().encode() if audit.hmac_key else None
    sign = _checkpoint.signer(audit.signing_key, key)
    public = sign.private.public_key() if sign.private is not None else None
    decode, problem = _decoder(args.config)
    if problem:
        print(problem, file=sys.stderr)
        return 1
    status = 0
    import time

    for spec in outputs:
        files = [p for _, p in rotated_files(spec.path)] + [spec.path, spec.checkpoint_path]
        files = [p for p in files if os.path.exists(p)]
        report = verify(files, key, public, decode=decode)
        if not report.ok:
            print(f"{spec.path}: not signed, the chain does not verify: {report.message}", file=sys.stderr)
            status = 1
            continue
        head = resume_point(spec.path, decode) or {}
        previous = _checkpoint.last(spec.checkpoint_path, spec.records)
        first = previous["first"] if previous else (first_seq(spec.path, decode) or 1)
        cp = _checkpoint.make(spec.records, head["seq"], head["hash"], first, time.time(), sign, "request")
        _checkpoint.append(spec.checkpoint_path, cp)
        print(f"{spec.checkpoint_path}: checkpoint seq {cp['seq']} ({cp['alg']}) at {cp['time']}")
    return status


def cmd_gen_key(args: argparse.Namespace) -> int:
    try:
        public = _checkpoint.write_signing_key(args.path)
    except OSError as e:
        print(f"{args.path}: {e.strerror}", file=sys.stderr)
        return 1
    sys.stdout.write(_checkpoint.public_pem(public).decode())
    return 0
