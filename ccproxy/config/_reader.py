"""Strict reading of YAML mappings into typed values.

Every getter names the YAML path of a fault; `Section.done()` refuses keys nobody asked for,
with a "did you mean" taken from the keys that were asked for.

Within `collecting()`, a fault with a safe way on (a value of the wrong type or out of range where
the key has a default) is recorded and the default used, so that one run reports every fault of a
file; a fault with none (a required key missing) is raised as before. Every value a getter returns
is also recorded under its key, so `document()` can rebuild the effective config in the file's own
schema (what `ccproxy check-config` prints, and what can be fed back).
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import ipaddress
import os
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

from ccproxy.secrets import Secret

T = TypeVar("T")


class ConfigError(Exception):
    """A fault in the configuration, with the YAML path it was found at.

    `faults` holds every fault found in the same run, this one (the likeliest cause) first.
    """

    def __init__(self, path: str, message: str) -> None:
        super().__init__(path, message)
        self.path = path
        self.message = message
        self.faults: list[ConfigError] = [self]

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message

    def all(self) -> str:
        """Every fault, one per line."""
        return "\n".join(str(fault) for fault in self.faults)


class _Run:
    """What one parse collects: faults it went on past, and every Section by its path."""

    def __init__(self) -> None:
        self.faults: list[ConfigError] = []
        self.sections: dict[str, Section] = {}
        # (path, masked value) of each secret given as a `${VAR}` reference
        self.secrets: list[tuple[str, str]] = []


_RUN: contextvars.ContextVar[_Run | None] = contextvars.ContextVar("ccproxy_config_run", default=None)


@contextlib.contextmanager
def collecting() -> Iterator[_Run]:
    run = _Run()
    token = _RUN.set(run)
    try:
        yield run
    finally:
        _RUN.reset(token)


def record(error: ConfigError) -> None:
    """Keep a fault that stopped part of the parse, in the order found (outside a run: raise it)."""
    run = _RUN.get()
    if run is None:
        raise error
    run.faults.append(error)


def _soft(error: ConfigError, default: Any) -> Any:
    """Record `error` and go on with `default` while collecting; raise it otherwise."""
    run = _RUN.get()
    if run is None or default is MISSING:
        raise error
    run.faults.append(error)
    return default


class Expanded(str):
    """A string that came out of `${VAR}` expansion: numeric getters may coerce it.

    `template` is the text before expansion: a secret is shown as its `${VAR}` reference.
    """

    template = ""


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

        expanded = Expanded(_ENV_RE.sub(sub, value))
        expanded.template = value
        return expanded
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
        # What each getter returned, by key, as it would be written in the file.
        self.values: dict[str, Any] = {}
        run = _RUN.get()
        if run is not None:
            run.sections[path] = self

    def _got(self, key: str, value: Any, shown: Any = MISSING) -> Any:
        self.values[key] = _plain(value) if shown is MISSING else shown
        return value

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
            return self._got(key, self.data[key])
        if default is MISSING:
            raise ConfigError(self.at(key), "is required")
        return self._got(key, default)

    def _typed(self, key: str, default: Any, kind: type | tuple[type, ...], what: str) -> Any:
        value = self.raw(key, default)
        if value is default and default is not MISSING:
            return value
        if isinstance(value, bool) and bool not in _as_tuple(kind):
            return self._got(key, _soft(ConfigError(self.at(key), f"expected {what}, got a boolean"), default))
        if not isinstance(value, kind):
            return self._got(key, _soft(ConfigError(self.at(key), f"expected {what}, got {_kind(value)}"), default))
        return value

    def string(self, key: str, default: Any = MISSING, *, choices: tuple[str, ...] | None = None,
            nonempty: bool = True) -> Any:
        value = self._typed(key, default, str, "a string")
        if isinstance(value, str) and value is not default:
            if nonempty and not value.strip():
                return self._got(key, _soft(ConfigError(self.at(key), "must not be empty"), default))
            if choices is not None and value not in choices:
                fault = ConfigError(self.at(key), f"must be one of {', '.join(choices)}, got {value!r}")
                return self._got(key, _soft(fault, default))
        return value

    def file(self, key: str, default: Any = MISSING) -> Any:
        """A file path; a relative one is taken from the config file's directory."""
        value = self.string(key, default)
        if value is None or value is default:
            return value
        return self._got(key, os.path.normpath(os.path.join(self.base_dir, os.path.expanduser(value))))

    def secret(self, key: str, default: Any = MISSING) -> Secret | None:
        """A secret string; an empty expansion (`${KEY:-}`) means "not set"."""
        value = self._typed(key, default, str, "a string")
        # Shown as the `${VAR}` it came from (so the printed config can be fed back, and reveals
        # nothing), or masked when the file holds the secret itself.
        reference = value.template if isinstance(value, Expanded) else None
        if value is None or value is default or not value.strip():
            empty = "" if isinstance(value, str) else None
            return self._got(key, None, reference if reference is not None else empty)
        secret = Secret(value.strip())
        run = _RUN.get()
        if run is not None and reference is not None:
            run.secrets.append((self.at(key), secret.masked()))
        return self._got(key, secret, reference if reference is not None else secret.masked())

    def boolean(self, key: str, default: Any = MISSING) -> Any:
        value = self.raw(key, default)
        if isinstance(value, Expanded) and value.lower() in ("true", "false"):
            return self._got(key, value.lower() == "true")
        if value is not default and not isinstance(value, bool):
            fault = ConfigError(self.at(key), f"expected true or false, got {_kind(value)}")
            return self._got(key, _soft(fault, default))
        return value

    def integer(self, key: str, default: Any = MISSING, *, min: int | None = None,
            max: int | None = None) -> Any:
        value = self.raw(key, default)
        if isinstance(value, Expanded) and value.strip().isdigit():
            value = int(value)
        if value is default and default is not MISSING:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            return self._got(key, _soft(ConfigError(self.at(key), f"expected an integer, got {_kind(value)}"),
                                        default))
        try:
            _check_range(self.at(key), value, min, max)
        except ConfigError as e:
            return self._got(key, _soft(e, default))
        return self._got(key, value)

    def duration(self, key: str, default: Any = MISSING, *, min: float | None = None,
                 max: float | None = None) -> Any:
        value = self.raw(key, default)
        if value is default and default is not MISSING:
            return self._got(key, value, _duration_text(value))
        try:
            seconds = parse_duration(value, self.at(key))
            _check_range(self.at(key), seconds, min, max)
        except ConfigError as e:
            seconds = _soft(e, default)
        return self._got(key, seconds, _duration_text(seconds))

    def size(self, key: str, default: Any = MISSING, *, min: int | None = None,
             max: int | None = None) -> Any:
        value = self.raw(key, default)
        if value is default and default is not MISSING:
            return value
        try:
            size = parse_size(value, self.at(key))
            _check_range(self.at(key), size, min, max)
        except ConfigError as e:
            size = _soft(e, default)
        return self._got(key, size)

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
            return self._got(key, tuple(default))
        return self._got(key, self.items(key, one))

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

    def done(self) -> None:
        """Refuse keys that no parser asked for, here and in every child section."""
        run = _RUN.get()
        for fault in self.unknown_keys():
            if run is None:
                raise fault
            run.faults.append(fault)

    def unknown_keys(self, known: Callable[[Section, str], bool] = lambda section, key: False,
                     typos_only: Callable[[Section], bool] = lambda section: False) -> list[ConfigError]:
        """Keys that no parser asked for, here and below; `known` says which to pass over anyway."""
        out = self._unknown(known, typos_only(self))
        for child in self._children.values():
            out += child.unknown_keys(known, typos_only)
        return out

    def _unknown(self, known: Callable[[Section, str], bool], typos_only: bool) -> list[ConfigError]:
        out = []
        for key in self.data:
            if key in self._asked or known(self, key):
                continue
            hint = difflib.get_close_matches(key, sorted(self._asked), n=1, cutoff=0.6)
            if typos_only and not hint:
                continue
            suffix = f" (did you mean {hint[0]}?)" if hint else ""
            out.append(ConfigError(self.at(key), f"unknown key{suffix}"))
        return out


def _duration_text(seconds: Any) -> Any:
    """A duration as the file would say it: `30s`, `250ms` (None stays None)."""
    if not isinstance(seconds, int | float) or isinstance(seconds, bool):
        return seconds
    if float(seconds).is_integer():
        whole = int(seconds)
        for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
            if whole and whole % size == 0:
                return f"{whole // size}{unit}"
        return f"{whole}s"
    return f"{seconds * 1000:g}ms"


def _plain(value: Any) -> Any:
    """A parsed value as YAML can write it; secrets masked."""
    if isinstance(value, Secret):
        return value.masked()
    if isinstance(value, Expanded):
        return str(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return str(value)
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return MISSING  # a parsed object: its own section holds what the file said


def document(run: _Run) -> dict[str, Any]:
    """The effective config in the file's schema: every key a parser read, with the value it used."""
    return _rebuild(run, "", run.sections[""].data if "" in run.sections else {})


def _rebuild(run: _Run, path: str, data: Any) -> Any:
    section = run.sections.get(path)
    if isinstance(data, Mapping) and section is not None:
        out: dict[str, Any] = {}
        for key in list(section.data) + [k for k in section.values if k not in section.data]:
            child_path = join(path, key)
            if key in section._children or (key in section.data and isinstance(section.data[key], Mapping)
                                             and child_path in run.sections):
                child = _rebuild(run, child_path, section.data.get(key) or {})
                if child != {} or key in section.data:
                    out[key] = child
            elif key in section.values:
                value = section.values[key]
                raw = section.data.get(key)
                if isinstance(raw, list) and any(join(child_path, i) in run.sections for i in range(len(raw))):
                    value = [_rebuild(run, join(child_path, i), item) for i, item in enumerate(raw)]
                # None is what an absent key means: written only where the file wrote null itself.
                if value is not MISSING and (value is not None or (key in section.data and raw is None)):
                    out[key] = value
        return out
    if isinstance(data, list):
        return [_rebuild(run, join(path, i), item) for i, item in enumerate(data)]
    return _plain(data)


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
