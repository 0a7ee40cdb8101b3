"""`privacy.keys`, `privacy.gdpr.right_to_deletion` / `data_portability`.

(`privacy.gdpr`'s anonymisation and retention are read by config/audit.py, beside the trail they shape.)
"""

from __future__ import annotations

import attrs

from ccproxy.config._reader import ConfigError, Section
from ccproxy.secrets import Secret

DEFAULT_KEY_STORE = "/var/lib/ccproxy/privacy"


@attrs.frozen
class PrivacyConfig:
    right_to_deletion: bool = False
    data_portability: bool = False
    key_store: str = DEFAULT_KEY_STORE
    master_key: Secret | None = None
    old_master_keys: tuple[Secret, ...] = ()

    @property
    def needs_keys(self) -> bool:
        return self.right_to_deletion

    @classmethod
    def parse(cls, root: Section) -> PrivacyConfig:
        privacy = root.section("privacy")
        gdpr = privacy.section("gdpr")
        keys = privacy.section("keys")
        deletion = portability = False
        if gdpr.enabled(True):
            deletion = bool(gdpr.boolean("right_to_deletion", False))
            portability = bool(gdpr.boolean("data_portability", False))
        store = keys.file("store", DEFAULT_KEY_STORE)
        master = keys.secret("master_key", None)
        master_file = keys.file("master_key_file", None)
        if master is not None and master_file is not None:
            raise ConfigError(keys.at("master_key_file"), "give master_key or master_key_file, not both")
        if master_file is not None:
            master = _read_key_file(master_file, keys.at("master_key_file"))
        olds = tuple(_old(item, path) for item, path in _items(keys, "old_master_keys"))
        if master is not None and len(master.reveal()) < 32:
            raise ConfigError(keys.at("master_key"), "must be at least 32 characters (e.g. `openssl rand -hex 32`)")
        if deletion and master is None:
            raise ConfigError(keys.at("master_key"),
                              "is required with privacy.gdpr.right_to_deletion (it protects the subject keys)")
        return cls(right_to_deletion=deletion, data_portability=portability, key_store=store,
                   master_key=master, old_master_keys=olds)


def _items(section: Section, key: str) -> list[tuple[object, str]]:
    values = section.sequence(key, [])
    return [(item, f"{section.at(key)}[{i}]") for i, item in enumerate(values)]


def _old(item: object, path: str) -> Secret:
    if not isinstance(item, str) or len(item) < 32:
        raise ConfigError(path, "must be a string of at least 32 characters")
    return Secret(item)


def _read_key_file(path: str, where: str) -> Secret:
    try:
        with open(path, encoding="utf-8") as f:
            value = f.read().strip()
    except OSError as e:
        raise ConfigError(where, f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(where, f"{path} is not text") from None
    if len(value) < 32:
        raise ConfigError(where, f"{path} must hold at least 32 characters")
    return Secret(value)
