"""How much: `security.rate_limiting`, `security.ip_blacklist.auto_block` and `state:`.

`security.ip_blacklist` itself (`enabled`, `ips`) belongs to the network config; only its
`auto_block` child is read here.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit

import attrs

from ccproxy.config._reader import ConfigError, Section
from ccproxy.secrets import Secret

MEMORY = "memory"
REDIS = "redis"
FAIL_OPEN = "fail_open"
FAIL_CLOSED = "fail_closed"

_DAY = 86400.0
_TIME_OF_DAY = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")


@attrs.frozen
class WindowLimits:
    """`requests_per_minute`, `requests_per_hour` and `burst` of one scope (global or per IP)."""

    requests_per_minute: int | None = None
    requests_per_hour: int | None = None
    burst: int | None = None

    @classmethod
    def parse(cls, section: Section) -> WindowLimits | None:
        if not section.data:
            section.done()
            return None
        limits = cls(
            requests_per_minute=section.integer("requests_per_minute", None, min=1),
            requests_per_hour=section.integer("requests_per_hour", None, min=1),
            burst=section.integer("burst", None, min=1),
        )
        if limits.requests_per_minute is None and limits.requests_per_hour is None:
            raise ConfigError(section.path, "give requests_per_minute, requests_per_hour or both")
        return limits


@attrs.frozen
class TierLimits:
    """One `per_key` tier: what every key of this tier may do."""

    name: str
    requests_per_minute: int | None = None
    daily_quota: int | None = None
    burst: int | None = None
    # Token budgets (input + output tokens of Messages, Chat Completions, Responses replies).
    tokens_per_minute: int | None = None
    daily_token_quota: int | None = None

    @classmethod
    def parse(cls, name: str, section: Section) -> TierLimits:
        tier = cls(
            name=name,
            requests_per_minute=section.integer("requests_per_minute", None, min=1),
            daily_quota=section.integer("daily_quota", None, min=1),
            burst=section.integer("burst", None, min=1),
            tokens_per_minute=section.integer("tokens_per_minute", None, min=1),
            daily_token_quota=section.integer("daily_token_quota", None, min=1),
        )
        if not any((tier.requests_per_minute, tier.daily_quota, tier.tokens_per_minute, tier.daily_token_quota)):
            raise ConfigError(section.path, "give requests_per_minute, daily_quota, tokens_per_minute or "
                                            "daily_token_quota")
        return tier


@attrs.frozen
class AutoBlock:
    enabled: bool = False
    threshold: int = 100  # requests in a minute
    duration: float = 3600.0

    @classmethod
    def parse(cls, section: Section) -> AutoBlock:
        if not section.enabled(bool(section.data)):
            section.integer("threshold", None)
            section.duration("duration", None)
            return cls()
        return cls(
            enabled=True,
            threshold=section.integer("threshold", 100, min=1),
            duration=section.duration("duration", 3600.0, min=1.0),
        )


@attrs.frozen
class RedisState:
    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    password: Secret | None = None
    timeout: float = 0.05
    on_error: str = FAIL_OPEN

    @classmethod
    def parse(cls, section: Section) -> RedisState:
        url = section.secret("url", None)
        text = url.reveal() if url is not None else "redis://127.0.0.1:6379/0"
        host, port, db, password = _parse_redis_url(text, section.at("url"))
        return cls(
            host=host,
            port=port,
            db=db,
            password=password,
            timeout=section.duration("timeout", 0.05, min=0.001, max=10.0),
            on_error=section.string("on_error", FAIL_OPEN, choices=(FAIL_OPEN, FAIL_CLOSED)),
        )


@attrs.frozen
class StateConfig:
    backend: str = MEMORY
    # Upper bound of the memory backend's table (one entry per active limit subject).
    max_entries: int = 100_000
    redis: RedisState = RedisState()

    @classmethod
    def parse(cls, section: Section) -> StateConfig:
        backend = section.string("backend", MEMORY, choices=(MEMORY, REDIS))
        memory = section.section("memory")
        max_entries = memory.integer("max_entries", 100_000, min=1000)
        # Checked even while the memory backend is chosen, so switching over later holds no surprise.
        redis = RedisState.parse(section.section("redis"))
        return cls(backend=backend, max_entries=max_entries, redis=redis)


@attrs.frozen
class LimitsConfig:
    enabled: bool = False
    global_: WindowLimits | None = None
    per_ip: WindowLimits | None = None
    per_key: tuple[TierLimits, ...] = ()
    # Seconds after midnight UTC at which daily quotas start a new day.
    daily_reset: float = 0.0
    auto_block: AutoBlock = AutoBlock()
    state: StateConfig = StateConfig()

    @property
    def active(self) -> bool:
        return self.enabled or self.auto_block.enabled

    def tier(self, name: str) -> TierLimits | None:
        for tier in self.per_key:
            if tier.name == name:
                return tier
        return None

    @classmethod
    def parse(cls, root: Section) -> LimitsConfig:
        security = root.section("security")
        auto_block = AutoBlock.parse(security.section("ip_blacklist").section("auto_block"))
        state = StateConfig.parse(root.section("state"))
        section = security.section("rate_limiting")
        if not section.enabled(bool(section.data)):
            # Switched off: its other keys are not checked, nothing of them is enforced.
            for key in section.keys():
                section.raw(key, None)
            return cls(auto_block=auto_block, state=state)
        per_key = section.section("per_key")
        return cls(
            enabled=True,
            global_=WindowLimits.parse(section.section("global")),
            per_ip=WindowLimits.parse(section.section("per_ip")),
            per_key=tuple(TierLimits.parse(name, per_key.section(name)) for name in per_key.keys()),
            daily_reset=_time_of_day(section.string("daily_reset", "00:00"), section.at("daily_reset")),
            auto_block=auto_block,
            state=state,
        )


def _time_of_day(value: str, path: str) -> float:
    match = _TIME_OF_DAY.match(value.strip())
    if match is None:
        raise ConfigError(path, f"expected a UTC time of day such as 00:00 or 07:30, got {value!r}")
    return (int(match.group(1)) * 60 + int(match.group(2))) * 60.0 % _DAY


def _parse_redis_url(url: str, path: str) -> tuple[str, int, int, Secret | None]:
    try:
        parts = urlsplit(url)
        port = parts.port or 6379
    except ValueError:
        raise ConfigError(path, "not a valid redis:// URL") from None
    if parts.scheme != "redis" or not parts.hostname:
        raise ConfigError(path, "expected redis://[:password@]host[:port][/db]")
    db_text = parts.path.strip("/") or "0"
    if not db_text.isdigit():
        raise ConfigError(path, f"the database number must be an integer, got {db_text!r}")
    password = Secret(unquote(parts.password)) if parts.password else None
    return parts.hostname, port, int(db_text), password
