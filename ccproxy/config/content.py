"""What goes in and what comes out: `security.request_validation`, `security.response_sanitization`.

Patterns are kept as strings (the config must stay plain data); each is compiled here once with
RE2 so a pattern RE2 refuses is a config error naming its YAML path, and compiled again, cached,
by the content layer.
"""

from __future__ import annotations

import re
from typing import Any

import attrs
import re2

from ccproxy.config._reader import ConfigError, Section
from ccproxy.content.masking import compile_re2
from ccproxy.content.parts import DEFAULT_PARTS, KINDS, Parts
from ccproxy.content.prefix import min_width

_RULE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")


@attrs.frozen
class RequestValidation:
    enabled: bool = False
    max_tokens: int | None = None
    max_messages: int | None = None
    max_message_length: int | None = None
    blocked_patterns: tuple[str, ...] = ()
    # Remove control characters other than newline and tab from every text before forwarding.
    strip_control_characters: bool = True

    @classmethod
    def parse(cls, section: Section) -> RequestValidation:
        # A section switched off is still read: a mistake in it is reported now, not when it is
        # switched on.
        enabled = section.enabled(bool(section.data))
        patterns = section.items("blocked_patterns", _pattern)
        return cls(
            enabled=enabled,
            max_tokens=section.integer("max_tokens", None, min=1),
            max_messages=section.integer("max_messages", None, min=1),
            max_message_length=section.integer("max_message_length", None, min=1),
            blocked_patterns=patterns,
            strip_control_characters=section.boolean("strip_control_characters", True),
        )


@attrs.frozen
class MaskPattern:
    name: str
    pattern: str
    replacement: str


@attrs.frozen
class ResponseSanitization:
    enabled: bool = False
    remove_system_prompts: bool = False
    # A verbatim run of the system prompt counts as an echo from this many bytes (characters, for
    # ASCII) on, or from this share of the prompt when that is shorter (short prompts).
    system_prompt_min_length: int = 300
    system_prompt_min_share: float = 0.5
    # Which kinds of parts of a reply are masked.
    mask_parts: Parts = DEFAULT_PARTS
    mask_api_keys: bool = False
    mask_emails: bool = False
    mask_phone_numbers: bool = False
    mask_patterns: tuple[MaskPattern, ...] = ()

    @classmethod
    def parse(cls, section: Section) -> ResponseSanitization:
        enabled = section.enabled(bool(section.data))
        patterns = section.items("mask_patterns", _mask_pattern)
        seen: set[str] = set()
        for i, p in enumerate(patterns):
            if p.name in seen:
                raise ConfigError(f"{section.at('mask_patterns')}[{i}].name", f"duplicate rule name {p.name!r}")
            seen.add(p.name)
        return cls(
            enabled=enabled,
            remove_system_prompts=section.boolean("remove_system_prompts", True),
            system_prompt_min_length=section.integer("system_prompt_min_length", 300, min=16, max=100000),
            system_prompt_min_share=_share(section, "system_prompt_min_share", 0.5),
            mask_parts=_parts(section.section("mask_parts")),
            mask_api_keys=section.boolean("mask_api_keys", True),
            mask_emails=section.boolean("mask_emails", True),
            mask_phone_numbers=section.boolean("mask_phone_numbers", True),
            mask_patterns=patterns,
        )


@attrs.frozen
class RoutesConfig:
    """`security.routes`: paths on the model upstreams forwarded besides the API paths ccproxy knows."""

    allow: tuple[str, ...] = ()

    @classmethod
    def parse(cls, section: Section) -> RoutesConfig:
        allow = section.items("allow", _allowed_path)
        section.done()
        return cls(allow=allow)


@attrs.frozen
class ContentConfig:
    request_validation: RequestValidation = RequestValidation()
    response_sanitization: ResponseSanitization = ResponseSanitization()
    routes: RoutesConfig = RoutesConfig()

    @classmethod
    def parse(cls, root: Section) -> ContentConfig:
        security = root.section("security")
        return cls(
            request_validation=RequestValidation.parse(security.section("request_validation")),
            response_sanitization=ResponseSanitization.parse(security.section("response_sanitization")),
            routes=RoutesConfig.parse(security.section("routes")),
        )


_ALLOWED_PATH = re.compile(r"^/(?:openai/)?v1(?:/(?:[A-Za-z0-9_.-]+|\*))+$")


def _allowed_path(value: Any, path: str) -> str:
    if not isinstance(value, str) or not _ALLOWED_PATH.match(value) or "/../" in value + "/" or "/./" in value + "/":
        raise ConfigError(path, "expected an API path such as /v1/files or /openai/v1/embeddings "
                                "(letters, digits, '_', '.', '-'; '*' for one whole id segment)")
    return value


def _share(section: Section, key: str, default: float) -> float:
    value = section.raw(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ConfigError(section.at(key), "expected a number greater than 0 and at most 1")
    return float(value)


def _parts(section: Section) -> Parts:
    values = {kind: section.boolean(kind, getattr(Parts(), kind)) for kind in KINDS}
    section.done()
    return Parts(**values)


def _pattern(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(path, "expected a non-empty regular expression")
    try:
        compile_re2(value)
    except re2.error as e:
        why = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else str(e)
        raise ConfigError(path, f"not a valid RE2 pattern: {why}") from None
    return value


def _mask_pattern(value: Any, path: str) -> MaskPattern:
    item = Section(value, path)
    name = item.string("name")
    if not _RULE_NAME.match(name):
        raise ConfigError(item.at("name"), "use letters, digits, '_', '.' or '-', starting with a letter")
    pattern = _pattern(item.raw("pattern"), item.at("pattern"))
    width = min_width(pattern)
    if width == 0 or (width is None and compile_re2(pattern).search("") is not None):
        raise ConfigError(item.at("pattern"), "matches the empty string; it would mask between every character")
    replacement = item.string("replacement", "[REDACTED]", nonempty=False)
    item.done()
    return MaskPattern(name, pattern, replacement)
