"""What an operator decided during an incident, kept across restarts: blocks and emergency mode.

The state lives in one JSON file, `incident.json`, under `admin.state_dir` (the unit's
StateDirectory, /var/lib/ccproxy). It is rewritten whole (written beside, then renamed) after each
change made through the admin socket; those are rare, small and made by people, so the write is
done at once rather than in a thread.
"""

from __future__ import annotations

import ipaddress
import json
import math
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import defer, task
from twisted.logger import Logger

from ccproxy import events
from ccproxy.blocklist import BlockList, Network
from ccproxy.config.overlay import write_atomically

log = Logger()

STATE_FILE = "incident.json"
# How often operator blocks that have run out are reported and dropped.
TICK = 1.0
# Blocks made by alert rules are written to the state file at most this long after they are made.
SAVE_DELAY = 1.0


def parse_target(text: str) -> Network:
    """An address or CIDR range, IPv4-mapped IPv6 unwrapped; raises ValueError with a clear message."""
    try:
        network = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"not an IP address or CIDR range: {text!r}") from None
    if isinstance(network, ipaddress.IPv6Network) and network.num_addresses == 1:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.ip_network(mapped)
    return network


def target_text(network: Network) -> str:
    return str(network.network_address) if network.num_addresses == 1 else str(network)


@attrs.frozen
class Block:
    target: str  # an address, or a range in CIDR notation
    until: float | None  # None: until unblocked
    reason: str
    by: str  # who made it: "uid 1000", "rule rate_limit_abuse"
    created: float

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


def _blocks(data: dict[str, Any], now: float) -> list[Block]:
    """The blocks of a state file (or snapshot) not yet over."""
    out = []
    for item in data.get("blocks", []):
        block = Block(
            target=str(item["target"]), until=None if item["until"] is None else float(item["until"]),
            reason=str(item["reason"]), by=str(item["by"]), created=float(item["created"]),
        )
        if block.until is None or block.until > now:
            out.append(block)
    return out


class IncidentState:
    """Operator blocks and the emergency switch; the BlockList is what the listener consults."""

    def __init__(self, state_dir: str | None, blocklist: BlockList, clock: Any) -> None:
        self.path = Path(state_dir) / STATE_FILE if state_dir else None
        self.blocklist = blocklist
        self.clock = clock
        self.blocks: dict[str, Block] = {}
        self.emergency = False
        self.emergency_since: float | None = None
        self.emergency_by = ""
        # When the switch last changed, here or (learned through `remote`) on another instance.
        self.emergency_changed = 0.0
        # Told when emergency mode is switched on (the listener closes open connections).
        self.on_emergency: list[Any] = []
        # Instances sharing Redis share the switch: `publish(dict)` and `async fetch() -> dict | None`.
        self.remote: Any = None
        # False in a worker of several: the supervisor keeps the file and reports every change;
        # this copy follows it (`mirror`) and writes nothing.
        self.keeper = True
        # In such a worker: where a block made by an alert rule here is sent (ip, duration, rule).
        self.forward_rule_block: Any = None
        self._tick: task.LoopingCall | None = None
        self._save_soon: Any = None

    # -- persistence

    def load(self) -> None:
        """Read the state file, if any; blocks already over are dropped. A damaged file is logged
        and set aside (renamed `.damaged`), never fatal: the proxy must start."""
        if self.path is None or not self.path.exists():
            return
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            for block in _blocks(data, self.clock.seconds()):
                self._apply(block)
            self._take_emergency(data)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            damaged = self.path.with_suffix(".damaged")
            log.error("incident state {path} is unreadable ({error}); moved to {damaged}, starting empty",
                      path=str(self.path), error=str(e), damaged=str(damaged))
            try:
                self.path.replace(damaged)
            except OSError:
                pass

    def save(self) -> None:
        """Raises OSError when the state directory cannot be written (the command then fails)."""
        if not self.keeper:
            return
        if self.path is None:
            raise OSError("admin.state_dir is not set")
        write_atomically(self.path, json.dumps(self.snapshot(), indent=1, sort_keys=True))

    def snapshot(self) -> dict[str, Any]:
        """Blocks and the switch as JSON values: the state file's content."""
        return {"blocks": [b.as_dict() for b in self.blocks.values()], "emergency": self._emergency_state()}

    def mirror(self, data: dict[str, Any]) -> None:
        """Take the state another process keeps (a worker following its supervisor's `snapshot`):
        nothing written, no event (the keeper reported the change); new blocks reach the listener
        at once (which closes their connections), and switching emergency mode on tells
        `on_emergency` as here."""
        blocks = {b.target: b for b in _blocks(data, self.clock.seconds())}
        for target in [t for t in self.blocks if t not in blocks]:
            self._remove(target)
        for target, block in blocks.items():
            if self.blocks.get(target) != block:
                self._apply(block)
        was = self.emergency
        self._take_emergency(data)
        if self.emergency and not was:
            for listener in list(self.on_emergency):
                listener()

    def _take_emergency(self, data: dict[str, Any]) -> None:
        emergency = data.get("emergency") or {}
        self.emergency = bool(emergency.get("enabled", False))
        self.emergency_since = emergency.get("since")
        self.emergency_by = str(emergency.get("by", ""))
        self.emergency_changed = float(emergency.get("changed", 0.0))

    # -- blocks

    def block(self, target: str, duration: float | None, reason: str, by: str) -> Block:
        network = parse_target(target)
        now = self.clock.seconds()
        block = Block(target_text(network), None if duration is None else now + duration, reason, by, now)
        previous = self.blocks.get(block.target)
        self._apply(block)
        try:
            self.save()
        except OSError:
            # Undo, so what is enforced is what survives a restart.
            self._remove(block.target)
            if previous is not None:
                self._apply(previous)
            raise
        events.emit("ip_blocked", "warning", ip_address=block.target, reason=reason, by=by,
                    until=block.until)
        return block

    def block_by_rule(self, ip: str, duration: float, rule: str) -> None:
        """A block an alert rule made: enforced at once, written to the state file within a second
        (a flood of addresses must not become a flood of file writes)."""
        now = self.clock.seconds()
        block = Block(target_text(parse_target(ip)), now + duration, f"alert rule {rule}", f"rule {rule}", now)
        self._apply(block)
        if self.forward_rule_block is not None:
            # A worker of several: the supervisor records it, reports it and tells the others.
            self.forward_rule_block(block.target, duration, rule)
            return
        events.emit("ip_blocked", "warning", ip_address=block.target, reason=block.reason, by=block.by,
                    until=block.until)
        if self._save_soon is None or not self._save_soon.active():
            self._save_soon = self.clock.callLater(SAVE_DELAY, self._save_logged)

    def _save_logged(self) -> None:
        self._save_soon = None
        try:
            self.save()
        except OSError as e:
            log.error("could not write the incident state: {error}", error=str(e))

    def unblock(self, target: str, by: str) -> bool:
        network = parse_target(target)
        text = target_text(network)
        known = text in self.blocks
        removed = self._remove(text)
        if known:
            self.save()
        if removed or known:
            events.emit("ip_unblocked", "notice", ip_address=text, reason="unblocked by command", by=by)
        return removed or known

    def forget(self, target: str) -> None:
        """Another instance lifted this block (through Redis): drop it here too, quietly (the
        lifting instance reported it)."""
        if self.blocks.pop(target, None) is not None:
            try:
                self.save()
            except OSError as e:
                log.error("could not write the incident state: {error}", error=str(e))

    def list(self) -> list[Block]:
        self.expire()
        return sorted(self.blocks.values(), key=lambda b: b.created)

    def _apply(self, block: Block) -> None:
        self.blocks[block.target] = block
        until = math.inf if block.until is None else block.until
        self.blocklist.block_network(parse_target(block.target), until)

    def _remove(self, text: str) -> bool:
        self.blocks.pop(text, None)
        return self.blocklist.unblock_network(parse_target(text))

    def expire(self) -> None:
        now = self.clock.seconds()
        gone = [b for b in self.blocks.values() if b.until is not None and b.until <= now]
        for block in gone:
            del self.blocks[block.target]
            events.emit("ip_unblocked", "notice", ip_address=block.target, reason="block expired", by=block.by)
        if gone:
            try:
                self.save()
            except OSError as e:
                log.error("could not write the incident state: {error}", error=str(e))

    # -- emergency mode

    def _emergency_state(self) -> dict[str, Any]:
        return {"enabled": self.emergency, "since": self.emergency_since, "by": self.emergency_by,
                "changed": self.emergency_changed}

    def set_emergency(self, enabled: bool, by: str) -> bool:
        """Returns whether the state changed."""
        if enabled == self.emergency:
            return False
        self._switch(enabled, self.clock.seconds() if enabled else None, by, self.clock.seconds())
        if self.remote is not None:
            self.remote.publish(self._emergency_state())
        return True

    def _switch(self, enabled: bool, since: float | None, by: str, changed: float, via: str = "") -> None:
        before = (self.emergency, self.emergency_since, self.emergency_by, self.emergency_changed)
        self.emergency, self.emergency_since, self.emergency_by, self.emergency_changed = enabled, since, by, changed
        try:
            self.save()
        except OSError:
            if not via:
                self.emergency, self.emergency_since, self.emergency_by, self.emergency_changed = before
                raise
            log.error("could not write the incident state; emergency mode follows {via} all the same", via=via)
        events.emit("emergency_mode", "alert" if enabled else "notice", enabled=enabled, by=by,
                    **({"via": via} if via else {}))
        if enabled:
            for listener in list(self.on_emergency):
                listener()

    async def follow(self) -> None:
        """Adopt a later switch made on another instance (read through `remote`)."""
        if self.remote is None:
            return
        shared = await self.remote.fetch()
        if isinstance(shared, dict):
            self.take_shared(shared)

    def take_shared(self, shared: dict[str, Any]) -> None:
        """The switch as another instance published it: taken if it is later than ours."""
        try:
            enabled, changed = bool(shared["enabled"]), float(shared["changed"])
            since = None if shared.get("since") is None else float(shared["since"])
        except (KeyError, TypeError, ValueError):
            return
        if changed > self.emergency_changed and enabled != self.emergency:
            self._switch(enabled, since, str(shared.get("by", ""))[:100], changed, via="redis")
        elif changed > self.emergency_changed:
            self.emergency_changed = changed

    def _tick_once(self) -> Any:
        self.expire()
        if self.remote is None:
            return None
        d = defer.ensureDeferred(self.follow())
        d.addErrback(lambda f: log.warn("could not read the shared emergency switch: {error}",
                                        error=f.getErrorMessage()))
        return d

    # -- life

    def start(self) -> None:
        self._tick = task.LoopingCall(self._tick_once)
        self._tick.clock = self.clock
        self._tick.start(TICK, now=False).addErrback(lambda f: log.failure("block expiry stopped", f))

    def stop(self) -> None:
        if self._tick is not None and self._tick.running:
            self._tick.stop()
        self._tick = None
        if self._save_soon is not None and self._save_soon.active():
            self._save_soon.cancel()
            self._save_logged()
