"""`privacy.keys`, `privacy.gdpr.right_to_deletion` / `data_portability`, `privacy.hipaa`.

(`privacy.gdpr`'s anonymisation and retention are read by config/audit.py, beside the trail they shape.)
HIPAA's settings mostly constrain the rest of the config: `check(config)` runs once it is all built.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import attrs

from ccproxy.config._reader import ConfigError, Section
from ccproxy.secrets import Secret

DEFAULT_KEY_STORE = "/var/lib/ccproxy/audit/privacy"


STRICT, STANDARD, COMPREHENSIVE = "strict", "standard", "comprehensive"


@attrs.frozen
class HipaaConfig:
    enabled: bool = False
    encryption_at_rest: bool = False
    encryption_in_transit: bool = False
    access_controls: str = STANDARD
    audit_logs: str = STANDARD

    @classmethod
    def parse(cls, s: Section) -> HipaaConfig:
        if not s.enabled(bool(s.data)):
            for key in list(s.keys()):
                s.raw(key, None)  # a switched-off section is accepted whole: nothing in it runs
            return cls()
        return cls(
            enabled=True,
            encryption_at_rest=bool(s.boolean("encryption_at_rest", False)),
            encryption_in_transit=bool(s.boolean("encryption_in_transit", False)),
            access_controls=s.string("access_controls", STANDARD, choices=(STANDARD, STRICT)),
            audit_logs=s.string("audit_logs", STANDARD, choices=(STANDARD, COMPREHENSIVE)),
        )


@attrs.frozen
class PrivacyConfig:
    right_to_deletion: bool = False
    data_portability: bool = False
    key_store: str = DEFAULT_KEY_STORE
    master_key: Secret | None = None
    old_master_keys: tuple[Secret, ...] = ()
    hipaa: HipaaConfig = attrs.Factory(HipaaConfig)

    @property
    def encryption_at_rest(self) -> bool:
        return self.hipaa.encryption_at_rest

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
        hipaa = HipaaConfig.parse(privacy.section("hipaa"))
        if hipaa.encryption_at_rest and master is None:
            raise ConfigError(keys.at("master_key"),
                              "is required with privacy.hipaa.encryption_at_rest (it protects the file key)")
        return cls(right_to_deletion=deletion, data_portability=portability, key_store=store,
                   master_key=master, old_master_keys=olds, hipaa=hipaa)


def _loopback(host: str) -> bool:
    from ccproxy.config.server import is_loopback

    return is_loopback(host)


def _plaintext_hops(config: Any) -> list[tuple[str, str]]:
    """(YAML path, what) of every hop that would cross the network in clear, loopback excepted."""
    from ccproxy.config.audit import SyslogOutput

    hops = []
    if not config.server.tls.enabled and not _loopback(config.server.host):
        hops.append(("server.tls.enabled", f"the listener on {config.server.host} has no TLS"))
    for name in ("anthropic", "openai"):
        url = getattr(config.upstreams, name).base_url
        parts = urlsplit(url)
        if parts.scheme == "http" and not _loopback(parts.hostname or ""):
            hops.append((f"upstreams.{name}.base_url", f"{url} is plain http"))
    if config.audit.enabled:
        for i, out in enumerate(config.audit.outputs):
            if isinstance(out, SyslogOutput) and out.protocol in ("tcp", "udp") and not out.tls \
                    and not _loopback(out.host):
                hops.append((f"security.audit.outputs[{i}]",
                             f"syslog over {out.protocol} to {out.host} without TLS (use protocol tcp with tls)"))
    state = config.limits.state
    if config.limits.enabled and state.backend == "redis" and not _loopback(state.redis.host):
        hops.append(("state.redis.url", f"Redis at {state.redis.host} is reached in clear"))
    return hops


def _access_faults(config: Any) -> list[tuple[str, str]]:
    auth = config.auth
    if not auth.enabled:
        return [("security.auth.enabled", "authentication is off (it must be on; with it, clients' credentials "
                                          "are never passed through to an upstream)")]
    if config.network.whitelist.enabled:
        return []
    open_keys = [key.id for key in auth.keys if not key.allowed_ips]
    if auth.type != "api_key" or open_keys:
        which = f"keys without allowed_ips: {', '.join(open_keys[:5])}" if open_keys else f"{auth.type} callers"
        return [("security.ip_whitelist", f"no IP whitelist, and {which} (each key needs allowed_ips, "
                                          "or an IP whitelist must be enabled)")]
    return []


def _audit_faults(config: Any) -> list[tuple[str, str]]:
    from ccproxy.config.audit import KNOWN_EVENTS

    audit = config.audit
    if not audit.enabled:
        return [("security.audit", "the audit trail is off")]
    if not any(out.records == "access" for out in audit.outputs):
        return [("security.audit.outputs", "no output has records: access (one record per request, refusals "
                                           "included)")]
    dropped = [name for name in KNOWN_EVENTS if name not in audit.events]
    if dropped:
        return [("security.audit.events", f"leaves out {', '.join(dropped[:5])}")]
    return []


def _settings(config: Any) -> list[tuple[str, bool, list[tuple[str, str]]]]:
    """(setting, asked for, faults) of each HIPAA setting."""
    hipaa = config.privacy.hipaa
    return [
        ("encryption_at_rest", hipaa.encryption_at_rest, []),  # the master key it needs is checked in parse
        ("encryption_in_transit", hipaa.encryption_in_transit, _plaintext_hops(config)),
        ("access_controls: strict", hipaa.access_controls == STRICT, _access_faults(config)),
        ("audit_logs: comprehensive", hipaa.audit_logs == COMPREHENSIVE, _audit_faults(config)),
    ]


def check(config: Any) -> None:
    """Refuse a config that breaks a HIPAA setting it asks for (the first fault, with its path)."""
    if not config.privacy.hipaa.enabled:
        return
    for name, wanted, faults in _settings(config):
        if wanted and faults:
            path, why = faults[0]
            raise ConfigError(path, f"{why}: privacy.hipaa.{name.split(':')[0]} forbids it")


def report(config: Any) -> list[str]:
    """One line per HIPAA setting: whether it is asked for, and whether the config meets it."""
    if not config.privacy.hipaa.enabled:
        return ["privacy.hipaa: off"]
    lines = []
    for name, wanted, faults in _settings(config):
        if wanted:
            lines.append(f"privacy.hipaa.{name}: holds")
        elif faults:
            lines.append(f"privacy.hipaa.{name}: not asked for, and would not hold ({faults[0][1]})")
        else:
            lines.append(f"privacy.hipaa.{name}: not asked for, though the config meets it")
    return lines


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
