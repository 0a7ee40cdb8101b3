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

from ccproxy.config._reader import ConfigError, Section, expand_env
from ccproxy.config.audit import AuditConfig
from ccproxy.config.auth import AuthConfig
from ccproxy.config.content import ContentConfig
from ccproxy.config.limits import LimitsConfig
from ccproxy.config.network import NetworkConfig
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

    def effective(self) -> dict[str, Any]:
        """The parsed config as plain data, every secret masked."""
        return attrs.asdict(self, value_serializer=_plain)


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
    return parse(data, base_dir=os.path.dirname(os.path.abspath(path)), environ=environ)


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
    data = expand_env({} if data is None else data, "", os.environ if environ is None else environ)
    root = Section(data, "", base_dir)
    try:
        config = _build(root)
    except ConfigError as e:
        # A misspelt key is the likelier cause of a fault found beside it: report the typo.
        raise (root.typo_near(e.path) or e) from None
    root.done()
    return config


def _build(root: Section) -> Config:
    root.unbuilt("monitoring")
    root.section("privacy").unbuilt("hipaa")
    return Config(
        server=ServerConfig.parse(root.section("server")),
        upstreams=UpstreamsConfig.parse(root.section("upstreams")),
        network=NetworkConfig.parse(root),
        auth=AuthConfig.parse(root),
        limits=LimitsConfig.parse(root),
        content=ContentConfig.parse(root),
        audit=AuditConfig.parse(root),
    )


def _plain(instance: Any, field: Any, value: Any) -> Any:
    if isinstance(value, Secret):
        return value.masked()
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value
