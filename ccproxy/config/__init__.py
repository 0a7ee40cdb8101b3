"""The configuration: YAML read once into frozen values.

`load()` is the only entry point; a reload calls it again and swaps the result in whole.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import yaml

from ccproxy.config._reader import ConfigError, Section, collecting, document, expand_env, record
from ccproxy.config.admin import AdminConfig, EmergencyConfig
from ccproxy.config.audit import AuditConfig
from ccproxy.config.auth import AuthConfig
from ccproxy.config.content import ContentConfig
from ccproxy.config.limits import LimitsConfig
from ccproxy.config.monitoring import MonitoringConfig
from ccproxy.config.network import NetworkConfig
from ccproxy.config.privacy import PrivacyConfig
from ccproxy.config.privacy import check as privacy_check
from ccproxy.config.server import ServerConfig, UpstreamsConfig
from ccproxy.secrets import Secret

__all__ = ["Config", "ConfigError", "load", "loads", "parse"]


@attrs.frozen
class Config:
    server: ServerConfig
    upstreams: UpstreamsConfig
    network: NetworkConfig
    auth: AuthConfig
    limits: LimitsConfig
    content: ContentConfig
    audit: AuditConfig
    privacy: PrivacyConfig = attrs.Factory(PrivacyConfig)
    admin: AdminConfig = attrs.Factory(AdminConfig)
    emergency: EmergencyConfig = attrs.Factory(EmergencyConfig)
    monitoring: MonitoringConfig = attrs.Factory(MonitoringConfig)
    # The effective config in the file's own schema (see `effective`).
    file_form: dict[str, Any] = attrs.field(factory=dict, eq=False, repr=False)
    # Secrets the file names by `${VAR}`, masked: (YAML path, masked value).
    secrets_shown: tuple[tuple[str, str], ...] = attrs.field(default=(), eq=False, repr=False)
    # What the rotated-keys overlay changed, for `check-config` to show (as comments).
    notes: tuple[str, ...] = attrs.field(default=(), eq=False, repr=False)

    def effective(self) -> dict[str, Any]:
        """The config as the parser read it, in the file's schema, defaults filled in, secrets masked:
        written out as YAML it is a config file that parses to the same values."""
        if self.file_form:
            return self.file_form
        return attrs.asdict(self, value_serializer=_plain,
                            filter=lambda a, v: a.name not in ("file_form", "secrets_shown", "notes"))


def load(path: str, environ: Mapping[str, str] | None = None) -> Config:
    """Read, expand and check the YAML file at `path`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError("", f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError("", f"{path} is not UTF-8 text") from None
    return loads(text, path, environ)


def loads(text: str, path: str, environ: Mapping[str, str] | None = None) -> Config:
    """Check `text`, the content of the YAML file at `path` (relative paths in it start there)."""
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except _DuplicateKey as e:
        raise ConfigError("", f"{path}: {e}") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise ConfigError("", f"{path} is not valid YAML{at}: {getattr(e, 'problem', e)}") from None
    config = parse(data, base_dir=os.path.dirname(os.path.abspath(path)), environ=environ)
    # Keys rotated with `ccproxy security rotate-key` (docs/incident-response.md).
    from ccproxy.config.overlay import with_overlay

    return with_overlay(config)


class _DuplicateKey(Exception):
    pass


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str | int | float | bool) and key in seen:
                line = key_node.start_mark.line + 1
                raise _DuplicateKey(f"key {key!r} appears twice in one mapping (line {line})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse(data: Any, base_dir: str = ".", environ: Mapping[str, str] | None = None) -> Config:
    """Check a YAML tree. A faulty one raises the likeliest fault, with every fault found in `.faults`."""
    data = expand_env({} if data is None else data, "", os.environ if environ is None else environ)
    with collecting() as run:
        root = Section(data, "", base_dir)
        parts, broken = _build(root)
        if broken:
            # Parsing stopped inside these paths, so keys there may be unread rather than unknown:
            # report only those close to a key that was read (likely typos), or to none the parser
            # would read anywhere (an empty config's parse tells which those are).
            reference = _reference_keys()
            unknown = root.unknown_keys(
                known=lambda section, key: key in reference.get(section.path, ()),
                typos_only=lambda section: any(_within(section.path, path) for path in broken),
            )
        else:
            unknown = root.unknown_keys()
        faults = [e for e in unknown if "did you mean" in e.message] + run.faults
        faults += [e for e in unknown if "did you mean" not in e.message]
        if faults:
            first = faults[0]
            first.faults = _distinct(faults)
            raise first
        config = Config(**parts, file_form=document(run), secrets_shown=tuple(run.secrets))
    privacy_check(config)  # rules across sections (HIPAA), once each section is valid
    return config


def _build(root: Section) -> tuple[dict[str, Any], list[str]]:
    """Each part parsed on its own, so that a fault in one does not hide the faults of the others."""
    parts: dict[str, Any] = {}
    broken: list[str] = []
    steps: list[tuple[str, Any]] = [
        ("server", lambda: ServerConfig.parse(root.section("server"))),
        ("upstreams", lambda: UpstreamsConfig.parse(root.section("upstreams"))),
        ("network", lambda: NetworkConfig.parse(root)),
        ("auth", lambda: AuthConfig.parse(root)),
        ("limits", lambda: LimitsConfig.parse(root)),
        ("content", lambda: ContentConfig.parse(root)),
        ("audit", lambda: AuditConfig.parse(root)),
        ("privacy", lambda: PrivacyConfig.parse(root)),
        ("admin", lambda: AdminConfig.parse(root)),
        ("emergency", lambda: EmergencyConfig.parse(root)),
        ("monitoring", lambda: MonitoringConfig.parse(root)),
    ]
    for name, step in steps:
        try:
            value = step()
        except ConfigError as e:
            record(e)
            broken.append(e.path)
            continue
        if name:
            parts[name] = value
    return parts, broken


_REFERENCE: dict[str, frozenset[str]] | None = None


def _reference_keys() -> dict[str, frozenset[str]]:
    """Keys the parser reads, by section path, for an empty config (every section at its defaults)."""
    global _REFERENCE
    if _REFERENCE is None:
        with collecting() as run:
            root = Section({}, "", ".")
            _build(root)
            _REFERENCE = {path: frozenset(section._asked) for path, section in run.sections.items()}
    return _REFERENCE


def _within(section: str, fault: str) -> bool:
    """Whether `section` is the section a fault at path `fault` was found in, or one of its parents."""
    return section == "" or fault == section or fault.startswith(section + ".") or fault.startswith(section + "[")


def _distinct(faults: list[ConfigError]) -> list[ConfigError]:
    seen: set[str] = set()
    out = []
    for fault in faults:
        if str(fault) not in seen:
            seen.add(str(fault))
            out.append(fault)
    return out


def _plain(instance: Any, field: Any, value: Any) -> Any:
    if isinstance(value, Secret):
        return value.masked()
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value
