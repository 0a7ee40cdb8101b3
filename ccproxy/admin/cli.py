"""`ccproxy security ...`: incident commands, sent to the running daemon over its admin socket.

Exit status 0 when the daemon did it, 1 with one line on standard error otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
from typing import Any

import yaml

from ccproxy.config.admin import DEFAULT_SOCKET

DEFAULT_CONFIG = "/etc/ccproxy/config.yaml"
TIMEOUT = 15.0


class Failure(Exception):
    pass


def socket_path(args: argparse.Namespace) -> str:
    """--socket, else `admin.socket` of --config (relative paths from the config's directory).

    Only that one key is read, without the rest of the config's checks or environment: the
    operator's shell need not hold the daemon's secrets to reach it.
    """
    if args.socket:
        return str(args.socket)
    try:
        with open(args.config, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise Failure(f"cannot read {args.config}: {e.strerror} (give --socket PATH)") from None
    except yaml.YAMLError:
        raise Failure(f"{args.config} is not valid YAML (give --socket PATH)") from None
    admin = data.get("admin") if isinstance(data, dict) else None
    value = admin.get("socket") if isinstance(admin, dict) else None
    if isinstance(admin, dict) and admin.get("enabled") is False:
        raise Failure(f"the admin socket is switched off in {args.config} (admin.enabled: false)")
    if not isinstance(value, str) or not value:
        return DEFAULT_SOCKET
    value = os.path.expandvars(os.path.expanduser(value))
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(args.config)), value))


def call(path: str, command: str, args: dict[str, Any]) -> Any:
    request = json.dumps({"command": command, "args": args}).encode() + b"\n"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(TIMEOUT)
            sock.connect(path)
            sock.sendall(request)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    except FileNotFoundError:
        raise Failure(f"no admin socket at {path}: is ccproxy running with this config?") from None
    except PermissionError:
        raise Failure(f"not allowed to use {path}: run as root or as the daemon's user") from None
    except TimeoutError:
        raise Failure(f"the daemon did not answer on {path} within {TIMEOUT:g}s") from None
    except OSError as e:
        raise Failure(f"cannot reach the daemon at {path}: {e.strerror or e}") from None
    try:
        answer = json.loads(b"".join(chunks))
    except ValueError:
        answer = None
    if not isinstance(answer, dict):  # cut short, or not our daemon behind that path
        raise Failure(f"the daemon at {path} gave no answer")
    if not answer.get("ok"):
        raise Failure(str(answer.get("error", "refused")))
    return answer.get("result")


def when(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def run(args: argparse.Namespace) -> int:
    command, params = args.security_args(args)
    try:
        result = call(socket_path(args), command, params)
    except Failure as e:
        print(f"ccproxy security {command}: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=1, sort_keys=True))
    else:
        print(args.security_show(result))
    return 0


def _block(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    return "block-ip", {"target": args.target, "duration": args.duration, "reason": args.reason}


def _show_block(r: dict[str, Any]) -> str:
    return f"blocked {r['target']} until {when(r['until'])} ({r['reason']})"


def _show_blocks(r: dict[str, Any]) -> str:
    if not r["blocks"]:
        return "no addresses are blocked"
    lines = [f"{'TARGET':<40} {'UNTIL':<21} {'BY':<22} REASON"]
    for b in r["blocks"]:
        lines.append(f"{b['target']:<40} {when(b['until']):<21} {b['by']:<22} {b['reason']}")
    return "\n".join(lines)


def _show_emergency(r: dict[str, Any]) -> str:
    state = "on" if r["emergency"] else "off"
    since = f" since {when(r['since'])} ({r['by']})" if r["emergency"] else ""
    return f"emergency mode is {state}{since}"


def _show_status(r: dict[str, Any]) -> str:
    return "\n".join(f"{k}: {v}" for k, v in r.items())


def _show_key(r: dict[str, Any]) -> str:
    return "\n".join([
        "# The new key, shown once: give it to the client now. ccproxy keeps only its digest.",
        f"key: {r['key']}",
        f"# {r['key_id']}: the previous key stays valid until {when(r['grace_until'])}, then is refused.",
        f"# Kept in {r['overlay']} (shown by `ccproxy check-config`).",
    ])


def _emergency(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    action = "enable" if args.enable else "disable" if args.disable else "status"
    return "emergency", {"action": action}


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    security = sub.add_parser("security", help="incident commands sent to the running daemon")
    where = security.add_mutually_exclusive_group()
    where.add_argument("--config", default=DEFAULT_CONFIG, help="the daemon's config (its admin.socket)")
    where.add_argument("--socket", help="the admin socket itself")
    security.add_argument("--json", action="store_true", help="print the daemon's answer as JSON")
    actions = security.add_subparsers(dest="security_command", required=True)

    def command(name: str, help: str, build: Any, show: Any) -> argparse.ArgumentParser:
        p = actions.add_parser(name, help=help)
        p.set_defaults(func=run, security_args=build, security_show=show)
        return p

    p = command("block-ip", "refuse an address or CIDR range at accept", _block, _show_block)
    p.add_argument("target", metavar="ADDR|CIDR")
    p.add_argument("--duration", help="how long (90s, 15m, 1h, 7d); default: until unblock-ip")
    p.add_argument("--reason", help="recorded with the block and in the audit trail")
    p = command("unblock-ip", "lift a block (operator or automatic)",
                lambda a: ("unblock-ip", {"target": a.target}), lambda r: f"unblocked {r['target']}")
    p.add_argument("target", metavar="ADDR|CIDR")
    command("list-blocks", "list blocked addresses and ranges", lambda a: ("list-blocks", {}), _show_blocks)
    command("status", "version, uptime, config digest, connections, blocks, emergency state",
            lambda a: ("status", {}), _show_status)
    p = command("emergency", "switch the security.emergency profile on or off", _emergency, _show_emergency)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--enable", action="store_true")
    group.add_argument("--disable", action="store_true")
    group.add_argument("--status", action="store_true")
    p = command("rotate-key", "make a new key for an API key id; the old one is refused after --grace",
                lambda a: ("rotate-key", {"key_id": a.key_id, "grace": a.grace}), _show_key)
    p.add_argument("--key-id", required=True)
    p.add_argument("--grace", default="24h", help="how long the old key stays valid (default 24h)")
