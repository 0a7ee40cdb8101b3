"""Strict reading of YAML mappings into typed values.

Every getter names the YAML path of a fault; `Section.done()` refuses keys nobody asked for,
with a "did you mean" taken from the keys that were asked for.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

from ccproxy.secrets import Secret

T = TypeVar("T")


class ConfigError(Exception):
    """A fault in the configuration, with the YAML path it was found at."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(path, message)
        self.path = path
        self.message = message

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class Expanded(str):
    """A string that came out of `${VAR}` expansion: numeric getters may coerce it."""


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def expand_env(value: Any, path: str, environ: Mapping[str, str]) -> Any:
    """Replace `${VAR}` and `${VAR:-default}` in every string of a YAML tree."""
    if isinstance(value, str):
        if "${" not in value:
            return value

        def sub(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in environ:
                return environ[name]
            if default is not None:
                return default
            raise ConfigError(path, f"environment variable {name} is not set and has no default")

        return Expanded(_ENV_RE.sub(sub, value))
    if isinstance(value, dict):
        return {k: expand_env(v, join(path, str(k)), environ) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, join(path, i), environ) for i, v in enumerate(value)]
    return value


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB|K|M|G)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024**2, "mb": 1024**2, "mib": 1024**2,
    "g": 1024**3, "gb": 1024**3, "gib": 1024**3,
}


def parse_duration(value: Any, path: str) -> float:
    """`30s`, `10m`, `1h`, `30d`, `250ms`, or a bare number of seconds."""
    if isinstance(value, bool):
        raise ConfigError(path, f"expected a duration such as 30s, 10m, 1h or 30d, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION_RE.match(str(value)) if isinstance(value, str) else None
        if match is None:
            raise ConfigError(path, f"expected a duration such as 30s, 10m, 1h or 30d, got {value!r}")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if seconds < 0:
        raise ConfigError(path, "a duration cannot be negative")
    return seconds


def parse_size(value: Any, path: str) -> int:
    """A byte count: `10485760`, `10MB`, `8KiB` (KB and KiB both mean 1024)."""
    if isinstance(value, bool):
        raise ConfigError(path, f"expected a size such as 8192 or 10MB, got {value!r}")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE_RE.match(value) if isinstance(value, str) else None
        if match is None:
            raise ConfigError(path, f"expected a size such as 8192 or 10MB, got {value!r}")
        unit = (match.group(2) or "b").lower()
        size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size < 0:
        raise ConfigError(path, "a size cannot be negative")
    return size


def parse_network(value: Any, path: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """An address or a CIDR range; host bits set are refused as likely typos."""
    if not isinstance(value, str):
        raise ConfigError(path, f"expected an IP address or CIDR range, got {value!r}")
    try:
        return ipaddress.ip_network(value.strip(), strict=True)
    except ValueError as e:
        raise ConfigError(path, f"not an IP address or CIDR range: {value!r} ({e})") from None


class Section:
    """One YAML mapping being read. Call `done()` when every key was asked for."""

    def __init__(self, data: Any, path: str, base_dir: str = ".") -> None:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(path or "(top level)", f"expected a mapping, got {_kind(data)}")
        for key in data:
            if not isinstance(key, str):
                raise ConfigError(join(path, str(key)), "keys must be strings")
        self.data: Mapping[str, Any] = data
        self.path = path
        self._asked: set[str] = set()
        self._children: dict[str, Section] = {}
        self.base_dir = base_dir

    def __contains__(self, key: str) -> bool:
        self._asked.add(key)
        return key in self.data

    def keys(self) -> Iterator[str]:
        return iter(self.data)

    def at(self, key: str) -> str:
        return join(self.path, key)

    def raw(self, key: str, default: Any = MISSING) -> Any:
        self._asked.add(key)
        if key in self.data and self.data[key] is not None:
            return self.data[key]
        if default is MISSING:
            raise ConfigError(self.at(key), "is required")
        return default

    def _typed(self, key: str, default: Any, kind: type | tuple[type, ...], what: str) -> Any:
        value = self.raw(key, default)
        if value is default and default is not MISSING:
            return value
        if isinstance(value, bool) and bool not in _as_tuple(kind):
            raise ConfigError(self.at(key), f"expected {what}, got a boolean")
        if not isinstance(value, kind):
            raise ConfigError(self.at(key), f"expected {what}, got {_kind(value)}")
        return value

    def string(self, key: str, default: Any = MISSING, *, choices: tuple[str, ...] | None = None,
            nonempty: bool = True) -> Any:
        value = self._typed(key, default, str, "a string")
        if isinstance(value, str):
            if nonempty and not value.strip():
                raise ConfigError(self.at(key), "must not be empty")
            if choices is not None and value not in choices:
                raise ConfigError(self.at(key), f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def file(self, key: str, default: Any = MISSING) -> Any:
        """A file path; a relative one is taken from the config file's directory."""
        value = self.string(key, default)
        if value is None or value is default:
            return value
        return os.path.normpath(os.path.join(self.base_dir, os.path.expanduser(value)))

    def secret(self, key: str, default: Any = MISSING) -> Secret | None:
        """A secret string; an empty expansion (`${KEY:-}`) means "not set"."""
        value = self._typed(key, default, str, "a string")
        if value is None or value is default or not value.strip():
            return None
        return Secret(value.strip())

    def boolean(self, key: str, default: Any = MISSING) -> Any:
        value = self.raw(key, default)
        if isinstance(value, Expanded) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if value is not default and not isinstance(value, bool):
            raise ConfigError(self.at(key), f"expected true or false, got {_kind(value)}")
        return value

    def integer(self, key: str, default: Any = MISSING, *, min: int | None = None,
            max: int | None = None) -> Any:
        value = self.raw(key, default)
        if isinstance(value, Expanded) and value.strip().isdigit():
            value = int(value)
        if value is default and default is not MISSING:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(self.at(key), f"expected an integer, got {_kind(value)}")
        _check_range(self.at(key), value, min, max)
        return value

    def duration(self, key: str, default: Any = MISSING, *, min: float | None = None,
                 max: float | None = None) -> Any:
        value = self.raw(key, default)
        if value is default and default is not MISSING:
            return value
        seconds = parse_duration(value, self.at(key))
        _check_range(self.at(key), seconds, min, max)
        return seconds

    def size(self, key: str, default: Any = MISSING, *, min: int | None = None,
             max: int | None = None) -> Any:
        value = self.raw(key, default)
        if value is default and default is not MISSING:
            return value
        size = parse_size(value, self.at(key))
        _check_range(self.at(key), size, min, max)
        return size

    def sequence(self, key: str, default: Any = MISSING) -> Any:
        return self._typed(key, default, list, "a list")

    def items(self, key: str, parse: Callable[[Any, str], T]) -> tuple[T, ...]:
        """A list whose every item goes through `parse(item, path)`."""
        values = self.sequence(key, [])
        return tuple(parse(item, join(self.at(key), i)) for i, item in enumerate(values))

    def str_list(self, key: str, default: Any = MISSING) -> tuple[str, ...]:
        def one(item: Any, path: str) -> str:
            if not isinstance(item, str) or not item:
                raise ConfigError(path, f"expected a non-empty string, got {_kind(item)}")
            return item

        if default is not MISSING and (key not in self.data or self.data[key] is None):
            self._asked.add(key)
            return tuple(default)
        return self.items(key, one)

    def section(self, key: str) -> Section:
        """The child mapping at `key` (empty if absent); the same object on every call."""
        self._asked.add(key)
        if key not in self._children:
            self._children[key] = Section(self.data.get(key), self.at(key), self.base_dir)
        return self._children[key]

    def enabled(self, default: bool) -> bool:
        return bool(self.boolean("enabled", default))

    def not_supported(self, key: str, why: str = "not supported yet") -> None:
        """Refuse a key of the documented format whose feature is not built."""
        self._asked.add(key)
        if key in self.data:
            raise ConfigError(self.at(key), why)

    def unbuilt(self, key: str) -> None:
        """Refuse a section of the documented format whose feature is not built.

        A section switched off with `enabled: false` is accepted: nothing in it is being ignored.
        """
        self._asked.add(key)
        value = self.data.get(key)
        if value is None:
            return
        if isinstance(value, Mapping) and value.get("enabled") is False:
            return
        raise ConfigError(self.at(key), "not supported yet")

    def typo_near(self, path: str) -> ConfigError | None:
        """An unknown key in the sections leading to `path`: likely the cause of a fault found there."""
        section: Section | None = self
        while section is not None:
            try:
                section._check_keys(typos_only=True)
            except ConfigError as e:
                return e
            section = next((c for c in section._children.values()
                            if path == c.path or path.startswith(c.path + ".") or path.startswith(c.path + "[")),
                           None)
        return None

    def done(self) -> None:
        """Refuse keys that no parser asked for, here and in every child section."""
        self._check_keys()
        for child in self._children.values():
            child.done()

    def _check_keys(self, typos_only: bool = False) -> None:
        for key in self.data:
            if key not in self._asked:
                hint = difflib.get_close_matches(key, sorted(self._asked), n=1, cutoff=0.6)
                if typos_only and not hint:
                    continue
                suffix = f" (did you mean {hint[0]}?)" if hint else ""
                raise ConfigError(self.at(key), f"unknown key{suffix}")


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _check_range(path: str, value: float, low: float | None, high: float | None) -> None:
    if low is not None and value < low:
        raise ConfigError(path, f"must be at least {low}, got {value}")
    if high is not None and value > high:
        raise ConfigError(path, f"must be at most {high}, got {value}")


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"a number ({value})"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__
