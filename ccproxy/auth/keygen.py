"""`ccproxy keys ...`: make a strong client key, or the digest of an existing one."""

from __future__ import annotations

import argparse
import hashlib
import secrets
import sys

PREFIX = "ccp_"


def new_key() -> str:
    """256 random bits, URL-safe, with a prefix that says what it is."""
    return PREFIX + secrets.token_urlsafe(32)


def sha256_hex(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def generate(args: argparse.Namespace) -> int:
    key = new_key()
    key_id = args.id or "key-" + secrets.token_hex(3)
    print("# Give the key to the client now: it is shown once and ccproxy keeps only its digest.")
    print(f"key: {key}")
    print("# Config entry (security.auth.api_keys or security.api_keys.keys):")
    print(f"- id: {key_id}")
    print(f"  key_sha256: {sha256_hex(key)}")
    return 0


def digest(args: argparse.Namespace) -> int:
    """Read a key from stdin (never from the command line, which others can see) and print its digest."""
    line = sys.stdin.readline().strip()
    if not line:
        print("no key on standard input", file=sys.stderr)
        return 1
    print(sha256_hex(line))
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = sub.add_parser("keys", help="make client API keys for security.auth")
    actions = keys.add_subparsers(dest="keys_command", required=True)
    p = actions.add_parser("generate", help="print a new strong key once, with its key_sha256 digest")
    p.add_argument("--id", help="the key id to put in the config entry")
    p.set_defaults(func=generate)
    p = actions.add_parser("digest", help="print the key_sha256 digest of a key read from stdin")
    p.set_defaults(func=digest)
