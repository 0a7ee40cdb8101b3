"""Key rotation without rewriting the config file: the rotated-keys overlay.

`ccproxy security rotate-key --key-id ID` makes a new key for the identity ID (same name, tier,
user, rate limit and allowed_ips as the config file's entry), and caps every key of that id valid
until then at the end of the grace period. Only the new key's SHA-256 digest is kept, in
`rotated-keys.json` under `admin.state_dir`. Each time the config is loaded (start, reload,
`ccproxy check-config`) the overlay is laid over `security.auth.api_keys`: the effective config
shows the rotated key as a second entry of the same id, with its `created` time, and the old entry
with `expires` set to the end of its grace.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from ccproxy.config._reader import ConfigError
from ccproxy.config.auth import API_KEY, ApiKey
from ccproxy.secrets import Secret

if TYPE_CHECKING:
    from ccproxy.config import Config

OVERLAY_FILE = "rotated-keys.json"


@attrs.frozen
class Rotation:
    key_id: str
    sha256: str  # hex digest of the new key
    created: float
    grace_until: float  # the keys it supersedes are refused from then on
    supersedes: tuple[str, ...]  # hex digests

    def as_dict(self) -> dict[str, Any]:
        return {**attrs.asdict(self), "supersedes": list(self.supersedes)}


def overlay_path(config: Config) -> Path:
    return Path(config.admin.state_dir) / OVERLAY_FILE


def read_overlay(path: Path) -> list[Rotation]:
    try:
        if not path.exists():
            return []
        data = json.loads(path.read_text(encoding="utf-8"))
        return [
            Rotation(str(r["key_id"]), str(r["sha256"]), float(r["created"]), float(r["grace_until"]),
                     tuple(str(d) for d in r["supersedes"]))
            for r in data["rotations"]
        ]
    except OSError as e:
        raise ConfigError("admin.state_dir", f"cannot read the rotated-keys overlay {path}: {e.strerror}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError("admin.state_dir", f"the rotated-keys overlay {path} is damaged: {e!r}") from None


def write_overlay(path: Path, rotations: list[Rotation], now: float) -> None:
    write_atomically(path, json.dumps({"rotations": [r.as_dict() for r in prune(rotations, now)]}, indent=1))


def prune(rotations: list[Rotation], now: float) -> list[Rotation]:
    """Drop rotations whose key a later rotation has retired for good (its grace is over)."""
    retired = {digest for r in rotations if r.grace_until <= now for digest in r.supersedes}
    return [r for r in rotations if r.sha256 not in retired]


def apply(config: Config, rotations: list[Rotation]) -> Config:
    """`config` with the rotations laid over its API keys, in order."""
    auth = config.auth
    if not rotations or not auth.enabled or auth.type != API_KEY:
        return config
    keys = list(auth.keys)
    notes = []
    for rotation in rotations:
        base = next((k for k in auth.keys if k.id == rotation.key_id), None)
        if base is None:
            continue  # the identity left the config file: its rotated keys go with it
        for i, key in enumerate(keys):
            if key.id == rotation.key_id and key.sha256.reveal() in rotation.supersedes:
                expires = rotation.grace_until if key.expires is None else min(key.expires, rotation.grace_until)
                keys[i] = attrs.evolve(key, expires=expires)
        new = Secret(rotation.sha256)
        if not any(k.sha256.reveal() == rotation.sha256 for k in keys):
            keys.append(attrs.evolve(base, sha256=new, expires=None, created=rotation.created))
        notes.append(f"rotated key of {rotation.key_id!r} (key_sha256 {new.masked()}) since {_when(rotation.created)}; "
                     f"the {len(rotation.supersedes)} before it valid until {_when(rotation.grace_until)}")
    return attrs.evolve(config, auth=attrs.evolve(auth, keys=tuple(keys)), notes=(*config.notes, *notes))


def _when(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def with_overlay(config: Config) -> Config:
    """What `ccproxy.config.load` returns: the file's config with the overlay applied."""
    if not config.auth.enabled or config.auth.type != API_KEY:
        return config
    path = overlay_path(config)
    applied = apply(config, read_overlay(path))
    if applied is config:
        return config
    return attrs.evolve(applied, notes=(f"with the rotated-keys overlay {path}:", *applied.notes))


def live_digests(keys: tuple[ApiKey, ...], key_id: str, now: float) -> tuple[str, ...]:
    return tuple(k.sha256.reveal() for k in keys if k.id == key_id and (k.expires is None or k.expires > now))


def write_atomically(path: Path, text: str) -> None:
    """Write beside, flush to disk, rename over: a crash leaves the old file or the new, never half."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
