"""The admin socket: a Unix socket (mode 0600, the daemon's user) that `ccproxy security` talks to.

One request per connection: a JSON object on one line (`{"command": ..., "args": {...}}`), one JSON
line back (`{"ok": true, "result": ...}` or `{"ok": false, "error": "..."}`), then the daemon closes.
Who sent it is read from the socket itself (SO_PEERCRED) and named in the audit event of every
command; only root and the daemon's own user are served, whatever the file's mode has become.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from twisted.internet import defer, tcp, unix
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver

from ccproxy import events
from ccproxy.admin.state import IncidentState, parse_target, target_text
from ccproxy.auth.keygen import new_key, sha256_hex
from ccproxy.config import Config
from ccproxy.config import overlay as keyfile
from ccproxy.config._reader import ConfigError, parse_duration
from ccproxy.config.auth import API_KEY
from ccproxy.limits import limiter_of, share_block

log = Logger()

MAX_REQUEST = 64 * 1024
# How long a client may take to send its request.
REQUEST_TIMEOUT = 10.0

def _version() -> str:
    import importlib.metadata  # only `status` asks: not loaded while the daemon idles

    try:
        return importlib.metadata.version("ccproxy")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class CommandError(Exception):
    """A refusal the CLI prints as its one line."""


class Admin:
    """The commands, over the running service's state."""

    def __init__(self, holder: Any, deps: Any, incident: IncidentState, reactor: Any, config_path: str,
                 gate: Any = None, rebuild: Callable[[Config], None] | None = None) -> None:
        self.holder = holder
        self.deps = deps
        self.incident = incident
        self.reactor = reactor
        self.config_path = config_path
        self.gate = gate
        self.rebuild = rebuild
        self.started = reactor.seconds()
        self.commands: dict[str, Callable[[dict[str, Any], str], Awaitable[Any]]] = {
            "status": self.status,
            "block-ip": self.block_ip,
            "unblock-ip": self.unblock_ip,
            "list-blocks": self.list_blocks,
            "emergency": self.emergency,
            "rotate-key": self.rotate_key,
        }

    async def run(self, request: Any, by: str) -> dict[str, Any]:
        if not isinstance(request, dict) or not isinstance(request.get("command"), str):
            return {"ok": False, "error": "expected a JSON object with a command"}
        name = request["command"]
        args = request.get("args") or {}
        command = self.commands.get(name)
        if command is None or not isinstance(args, dict):
            return {"ok": False, "error": f"unknown command {name[:40]!r}"}
        try:
            result = await command(args, by)
        except (CommandError, ValueError, ConfigError) as e:
            events.emit("admin_command", "warning", command=name, by=by, outcome="refused", reason=str(e))
            return {"ok": False, "error": str(e)}
        except OSError as e:
            events.emit("admin_command", "error", command=name, by=by, outcome="failed", reason=str(e))
            return {"ok": False, "error": f"could not keep the change: {e.strerror or e}"}
        reads = name in _READS or (name == "emergency" and args.get("action", "status") == "status")
        events.emit("admin_command", "info" if reads else "notice", command=name, by=by, outcome="done")
        return {"ok": True, "result": result}

    async def status(self, args: dict[str, Any], by: str) -> dict[str, Any]:
        runtime = self.holder.current
        config: Config = runtime.config
        limiter = limiter_of(runtime)
        backend = config.limits.state.backend if config.limits.active else "none"
        healthy = limiter is None or not getattr(limiter, "down_reported", 0.0)
        return {
            **self.about(config),
            "connections": getattr(self.gate, "total", None),
            "blocked": len(self.deps.blocklist),
            "operator_blocks": len(self.incident.blocks),
            "emergency": self.incident.emergency,
            "emergency_since": self.incident.emergency_since,
            "state_backend": backend,
            "state_backend_up": healthy,
        }

    def about(self, config: Config) -> dict[str, Any]:
        """What `status` says of the daemon itself."""
        return {
            "version": _version(),
            "pid": os.getpid(),
            "uptime_seconds": round(self.reactor.seconds() - self.started, 1),
            "config_path": self.config_path,
            "config_sha256": config_digest(config),
            "ready": bool(self.holder.ready),
        }

    async def block_ip(self, args: dict[str, Any], by: str) -> dict[str, Any]:
        target = _text(args, "target")
        duration = _duration(args.get("duration"))
        reason = _printable(str(args.get("reason") or "blocked by command")[:200])
        block = self.incident.block(target, duration, reason, by)
        share_block(self.holder, block.target, math.inf if block.until is None else block.until)
        return block.as_dict()

    async def unblock_ip(self, args: dict[str, Any], by: str) -> dict[str, Any]:
        target = target_text(parse_target(_text(args, "target")))
        limiter = limiter_of(self.holder.current)
        automatic = limiter is not None and target in limiter.blocks
        if not self.incident.unblock(target, by) and not automatic:
            raise CommandError(f"{target} is not blocked")
        if limiter is not None:
            limiter.lift(target)
        share_block(self.holder, target, None)
        return {"target": target}

    async def list_blocks(self, args: dict[str, Any], by: str) -> dict[str, Any]:
        now = self.reactor.seconds()
        operator = [b.as_dict() for b in self.incident.list()]
        limiter = limiter_of(self.holder.current)
        auto = []
        if limiter is not None:
            auto = [{"target": ip, "until": until, "reason": "auto_block", "by": "auto_block"}
                    for ip, until in sorted(limiter.blocks.items()) if until > now
                    and ip not in self.incident.blocks]
        return {"blocks": operator + auto, "now": now}

    async def emergency(self, args: dict[str, Any], by: str) -> dict[str, Any]:
        action = args.get("action", "status")
        if action not in ("enable", "disable", "status"):
            raise CommandError("emergency: give --enable, --disable or --status")
        changed = False
        if action != "status":
            changed = self.incident.set_emergency(action == "enable", by)
        return {"emergency": self.incident.emergency, "since": self.incident.emergency_since,
                "by": self.incident.emergency_by, "changed": changed}

    async def rotate_key(self, args: dict[str, Any], by: str) -> dict[str, Any]:
        key_id = _text(args, "key_id")
        grace = _duration(args.get("grace", "24h"))
        if grace is None:
            grace = 86400.0
        config: Config = self.holder.current.config
        if not config.auth.enabled or config.auth.type != API_KEY:
            raise CommandError("rotate-key needs security.auth enabled with type api_key")
        if not any(k.id == key_id for k in config.auth.keys):
            raise CommandError(f"no API key with id {key_id!r} in the config")
        now = self.reactor.seconds()
        key = new_key()
        rotation = keyfile.Rotation(key_id, sha256_hex(key), now, now + grace,
                                    keyfile.live_digests(config.auth.keys, key_id, now))
        path = keyfile.overlay_path(config)
        keyfile.write_overlay(path, [*keyfile.read_overlay(path), rotation], now)
        if self.rebuild is not None:
            self.rebuild(keyfile.apply(config, [rotation]))
        events.emit("api_key_rotation", "notice", api_key_id=key_id, by=by, replaced=[key_id],
                    grace_until=rotation.grace_until, overlay=str(path))
        return {"key_id": key_id, "key": key, "grace_until": rotation.grace_until, "overlay": str(path)}


# Commands that change nothing: recorded at info (a monitoring script polling status is not news).
_READS = frozenset({"status", "list-blocks"})


def _printable(text: str) -> str:
    """An operator's free text as it may reach logs: control characters escaped."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def _text(args: dict[str, Any], name: str) -> str:
    value = args.get(name)
    if not isinstance(value, str) or not value.strip() or len(value) > 200:
        raise CommandError(f"missing or invalid {name}")
    return value.strip()


def _duration(value: Any) -> float | None:
    if value is None:
        return None
    try:
        seconds = parse_duration(value, "duration")
    except ConfigError:
        raise CommandError(f"invalid duration {value!r} (examples: 90s, 15m, 1h, 7d)") from None
    if seconds <= 0:
        raise CommandError("a duration must be positive")
    return seconds


def config_digest(config: Config) -> str:
    text = json.dumps(config.effective(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def peer_credentials(transport: Any) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of the process at the other end of a Unix socket."""
    try:
        sock = transport.getHandle()
        data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (AttributeError, OSError):
        return None
    pid, uid, gid = struct.unpack("3i", data)
    return pid, uid, gid


class AdminProtocol(LineOnlyReceiver):
    delimiter = b"\n"
    MAX_LENGTH = MAX_REQUEST

    def __init__(self, admin: Admin) -> None:
        self.admin = admin
        self.busy = False
        self.allowed = True
        self.by = "unknown"
        self.deadline: Any = None

    def connectionMade(self) -> None:
        # A client that never sends its request must not hold the connection.
        self.deadline = self.admin.reactor.callLater(REQUEST_TIMEOUT, self._too_slow)
        creds = peer_credentials(self.transport)
        if creds is None:
            return  # no SO_PEERCRED here: the socket file's mode is the only guard
        pid, uid, _ = creds
        self.by = f"uid={uid} pid={pid}"
        self.allowed = uid in (0, os.geteuid())

    def lineReceived(self, line: bytes) -> None:
        if self.busy:
            return
        self.busy = True
        if not self.allowed:
            events.emit("admin_command", "warning", command="-", by=self.by, outcome="refused",
                        reason="peer is neither root nor the daemon's user")
            self._answer({"ok": False, "error": "not allowed: run as root or as the daemon's user"})
            return
        try:
            request = json.loads(line)
        except ValueError:
            self._answer({"ok": False, "error": "the request is not JSON"})
            return
        d = defer.ensureDeferred(self.admin.run(request, self.by))
        d.addCallback(self._answer)
        d.addErrback(self._failed)

    def _too_slow(self) -> None:
        self.deadline = None
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Any = None) -> None:
        if self.deadline is not None and self.deadline.active():
            self.deadline.cancel()
        self.deadline = None

    def _failed(self, failure: Any) -> None:
        log.failure("admin command failed", failure)
        self._answer({"ok": False, "error": "internal error; see the daemon's log"})

    def lineLengthExceeded(self, line: bytes) -> None:
        self._answer({"ok": False, "error": "request too long"})

    def _answer(self, answer: dict[str, Any]) -> None:
        if self.transport is None:
            return
        self.transport.write(json.dumps(answer, default=str).encode() + b"\n")
        self.transport.loseConnection()


class AdminFactory(Factory):
    noisy = False

    def __init__(self, admin: Admin) -> None:
        self.admin = admin

    def buildProtocol(self, addr: Any) -> AdminProtocol:
        protocol = AdminProtocol(self.admin)
        protocol.factory = self
        return protocol


def listen(reactor: Any, path: str, admin: Admin) -> Any:
    """Listen on `path` (0600); a stale socket left by a previous run is replaced, any other file
    there is refused. Raises OSError when the directory cannot be made or used."""
    where = Path(path)
    where.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        mode = where.lstat().st_mode
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(mode):
            raise OSError(f"{path} exists and is not a socket")
        where.unlink()
    # The socket is created with the umask's mode and only then chmod-ed: no moment open to others.
    umask = os.umask(0o077)
    try:
        port = _SocketFile(os.fsencode(path), AdminFactory(admin), mode=0o600, wantPID=False, reactor=reactor)
        port.path = path
        port.startListening()
        return port
    finally:
        os.umask(umask)


def _made(path: Any) -> tuple[int, int]:
    """Which file is at `path`: its inode, and when it was made (an inode number freed by the
    unlink of the previous socket may be given to the next at once)."""
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns


class _SocketFile(unix.Port):
    """A listening Unix socket that, when it stops, removes its file only if the file is still its
    own: after a restart by handover (SIGUSR2) the successor has put its socket at the same path
    while this process drains, and the operator's commands must keep reaching it."""

    path = ""
    made: tuple[int, int] | None = None

    def startListening(self) -> None:
        super().startListening()
        self.made = _made(self.path)

    def connectionLost(self, reason: Any) -> None:
        try:
            ours = _made(self.path) == self.made
        except OSError:
            ours = False
        if ours:
            super().connectionLost(reason)
        else:
            tcp.Port.connectionLost(self, reason)
