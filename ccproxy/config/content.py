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
    # The shortest run of the system prompt that counts as repeating it.
    system_prompt_min_length: int = 32
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
            system_prompt_min_length=section.integer("system_prompt_min_length", 32, min=8, max=10000),
            mask_api_keys=section.boolean("mask_api_keys", True),
            mask_emails=section.boolean("mask_emails", True),
            mask_phone_numbers=section.boolean("mask_phone_numbers", True),
            mask_patterns=patterns,
        )


@attrs.frozen
class ContentConfig:
    request_validation: RequestValidation = RequestValidation()
    response_sanitization: ResponseSanitization = ResponseSanitization()

    @classmethod
    def parse(cls, root: Section) -> ContentConfig:
        security = root.section("security")
        return cls(
            request_validation=RequestValidation.parse(security.section("request_validation")),
            response_sanitization=ResponseSanitization.parse(security.section("response_sanitization")),
        )


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
