"""`ccproxy privacy ...`: erase a subject, export a subject's records, rotate the master key.

Each reads the daemon's config (`--config`) for the key store and the audit files; none needs the
daemon to run, and each is safe while it runs (the key store is shared through its files).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

from ccproxy.audit import _checkpoint
from ccproxy.audit._file import rotated_files
from ccproxy.audit._record import NotCanonical

DEFAULT_CONFIG = "/etc/ccproxy/config.yaml"


def add_parser(sub: Any) -> None:
    p = sub.add_parser("privacy", help="GDPR tools: erase or export a data subject, rotate the master key")
    privacy_sub = p.add_subparsers(dest="privacy_command", required=True)
    for name, func, text in (
        ("forget", cmd_forget, "destroy a subject's key: its personal data in every record becomes unreadable"),
        ("export", cmd_export, "every record of a subject, decrypted, as JSON lines (data portability)"),
    ):
        p = privacy_sub.add_parser(name, help=text)
        p.add_argument("--config", default=DEFAULT_CONFIG, metavar="PATH")
        who = p.add_mutually_exclusive_group(required=True)
        who.add_argument("--user-id", metavar="ID")
        who.add_argument("--key-id", metavar="ID")
        who.add_argument("--ip", metavar="ADDR")
        if name == "export":
            p.add_argument("--since", metavar="DATE", help="only records from this date or time on (ISO 8601, UTC)")
        p.set_defaults(func=func)
    p = privacy_sub.add_parser("rotate-master-key",
                               help="wrap every key of the store under the config's current master key")
    p.add_argument("--config", default=DEFAULT_CONFIG, metavar="PATH")
    p.set_defaults(func=cmd_rotate)


def _load(path: str) -> Any:
    from ccproxy.config import ConfigError, load

    try:
        return load(path)
    except ConfigError as e:
        print(f"{path}: invalid: {e}", file=sys.stderr)
        return None


def _subject(args: argparse.Namespace) -> tuple[str, str]:
    if args.user_id is not None:
        return "user_id", args.user_id
    if args.key_id is not None:
        return "api_key_id", args.key_id
    return "ip_address", args.ip


def _store(config: Any) -> Any:
    from ccproxy.audit.privacy import KeyStoreError, open_store

    try:
        return open_store(config.privacy)
    except (OSError, ValueError, KeyStoreError) as e:
        print(f"privacy key store {config.privacy.key_store}: {e}", file=sys.stderr)
        return None


def cmd_forget(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return 1
    if not config.privacy.right_to_deletion:
        print("privacy.gdpr.right_to_deletion is off: records hold personal data in clear and nothing can be "
              "erased by destroying a key", file=sys.stderr)
        return 1
    store = _store(config)
    if store is None:
        return 1
    kind, value = _subject(args)
    sid = store.subject_id(kind, value)
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    had = store.forget(sid, kind, now)
    what = "key destroyed" if had else "had no key (no record of it was sealed, or it was erased before)"
    print(f"subject {sid}: {what}; the erasure is recorded in the audit trail as privacy_subject_erased")
    return 0


def _files(config: Any) -> Iterator[tuple[str, str]]:
    """(stream, path) of every audit and access file the config's file outputs wrote, oldest first."""
    from ccproxy.config.audit import FileOutput

    for spec in config.audit.outputs:
        if isinstance(spec, FileOutput):
            for _, path in rotated_files(spec.path):
                yield spec.records, path
            if os.path.exists(spec.path):
                yield spec.records, spec.path


def _since(text: str | None) -> str:
    if not text:
        return ""
    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise SystemExit(f"--since {text!r}: not an ISO 8601 date or time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def cmd_export(args: argparse.Namespace) -> int:
    from ccproxy.audit.privacy import at_rest_decoder, open_sealed

    config = _load(args.config)
    if config is None:
        return 1
    if not config.privacy.data_portability:
        print("privacy.gdpr.data_portability is off: turn it on to export a subject's records", file=sys.stderr)
        return 1
    decode, problem = at_rest_decoder(config)
    if problem:
        print(problem, file=sys.stderr)
        return 1
    kind, value = _subject(args)
    store = _store(config) if config.privacy.right_to_deletion else None
    if config.privacy.right_to_deletion and store is None:
        return 1
    sid = store.subject_id(kind, value) if store is not None else None
    key = store.subject_key(sid, create=False) if store is not None and sid is not None else None
    since = _since(args.since)
    exported = unreadable = 0
    out = sys.stdout
    for stream, path in _files(config):
        with open(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                try:
                    record = decode(raw.rstrip(b"\n"))
                except NotCanonical:
                    continue  # verify is the tool that judges damaged lines
                if _checkpoint.is_checkpoint(record) or str(record.get("timestamp", "")) < since:
                    continue
                if sid is not None:
                    if record.get("subject") != sid:
                        continue
                    opened = open_sealed(record, key) if key is not None else None
                    if opened is None:
                        unreadable += 1
                        continue
                    record = opened
                elif str(record.get(kind)) != value:
                    continue
                out.write(json.dumps({"stream": stream, "file": path, "line": number, "record": record},
                                     separators=(",", ":")) + "\n")
                exported += 1
    note = f"; {unreadable} records of this subject were erased (its key was destroyed)" if unreadable else ""
    print(f"exported {exported} records{note}", file=sys.stderr)
    return 0


def cmd_rotate(args: argparse.Namespace) -> int:
    from ccproxy.audit.privacy import KeyStoreError

    config = _load(args.config)
    if config is None:
        return 1
    store = _store(config)
    if store is None:
        return 1
    try:
        done, kept = store.rewrap()
    except (OSError, KeyStoreError) as e:
        print(f"not every key was rewrapped: {e}", file=sys.stderr)
        return 1
    print(f"{done} keys rewrapped under master key {store.current}, {kept} already were; no record was rewritten. "
          "The old master key can now leave privacy.keys.old_master_keys.")
    return 0
