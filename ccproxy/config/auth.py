"""Who may call: `security.auth` and `security.api_keys`.

Both key lists of the documented format are read into one set of `ApiKey`s: `security.auth.api_keys`
(named client keys) and `security.api_keys.keys` (rotatable keys). Every entry takes the same fields;
`security.api_keys.rotation_period` and `notification_before` apply to every key of both lists.
See docs/auth.md.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from typing import Any
from urllib.parse import urlsplit

import attrs

from ccproxy.config._reader import ConfigError, Section, join, parse_network
from ccproxy.config.server import is_loopback
from ccproxy.secrets import Secret

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

API_KEY, JWT, OAUTH2 = "api_key", "jwt", "oauth2"
TYPES = (API_KEY, JWT, OAUTH2)
# A key typed from an environment variable must be long enough not to be guessed.
MIN_KEY_LENGTH = 16
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}$")
HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
ASYMMETRIC_ALGORITHMS = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
)


@attrs.frozen
class ApiKey:
    """One client key. `digest` is what requests are compared against."""

    id: str
    # SHA-256 of the key, in hex: the plaintext is never kept. A Secret so that the effective
    # config and logs show only a mask of it.
    sha256: Secret = attrs.field(repr=False)
    name: str | None = None
    tier: str = "default"
    user_id: str | None = None
    rate_limit: int | None = None
    allowed_ips: tuple[Network, ...] = ()
    # Seconds since the epoch (UTC); None means never.
    expires: float | None = None
    created: float | None = None

    @property
    def digest(self) -> bytes:
        return bytes.fromhex(self.sha256.reveal())


@attrs.frozen
class JwtConfig:
    algorithms: tuple[str, ...]
    public_key_file: str | None = None
    secret: Secret | None = None
    jwks_url: str | None = None
    jwks_refresh: float = 600.0
    jwks_min_refresh_interval: float = 30.0
    jwks_max_stale: float = 86400.0
    jwks_timeout: float = 5.0
    issuer: str | None = None
    audience: tuple[str, ...] = ()
    leeway: float = 30.0
    user_claim: str = "sub"
    tier_claim: str | None = None
    require: tuple[str, ...] = ("exp",)

    @classmethod
    def parse(cls, s: Section) -> JwtConfig:
        # Every key is read before any is judged, so a typo elsewhere is reported as such.
        sources = [k for k in ("public_key_file", "secret", "jwks_url") if s.raw(k, None) is not None]
        value = cls(
            algorithms=s.str_list("algorithms"),
            public_key_file=s.file("public_key_file", None),
            secret=s.secret("secret", None),
            jwks_url=_url(s, "jwks_url"),
            jwks_refresh=s.duration("jwks_refresh", 600.0, min=1, max=86400 * 7),
            jwks_min_refresh_interval=s.duration("jwks_min_refresh_interval", 30.0, min=0.1, max=86400),
            jwks_max_stale=s.duration("jwks_max_stale", 86400.0, min=1),
            jwks_timeout=s.duration("jwks_timeout", 5.0, min=0.05, max=120),
            issuer=s.string("issuer", None),
            audience=_str_or_list(s, "audience"),
            leeway=s.duration("leeway", 30.0, max=3600),
            user_claim=s.string("user_claim", "sub"),
            tier_claim=s.string("tier_claim", None),
            require=s.str_list("require", ("exp",)),
        )
        if len(sources) != 1:
            raise ConfigError(s.path, "exactly one of public_key_file, secret, jwks_url is required")
        value._check_algorithms(s, symmetric=sources[0] == "secret")
        if value.public_key_file is not None:
            load_public_key(value.public_key_file, s.at("public_key_file"))
        return value

    def _check_algorithms(self, s: Section, symmetric: bool) -> None:
        if not self.algorithms:
            raise ConfigError(s.at("algorithms"), "must name at least one algorithm")
        allowed = HMAC_ALGORITHMS if symmetric else ASYMMETRIC_ALGORITHMS
        for i, alg in enumerate(self.algorithms):
            if alg not in allowed:
                why = "a shared secret" if symmetric else "a public key"
                raise ConfigError(join(s.at("algorithms"), i),
                                  f"{alg!r} cannot be used with {why}; allowed: {', '.join(allowed)}")
        if symmetric and self.secret is None:
            raise ConfigError(s.at("secret"), "is empty (is the environment variable set?)")
        if symmetric and len(self.secret.reveal().encode()) < 32:  # type: ignore[union-attr]
            raise ConfigError(s.at("secret"), "must be at least 32 bytes long")


@attrs.frozen
class OAuth2Config:
    introspection_url: str
    client_id: str
    client_secret: Secret = attrs.field(repr=False)
    timeout: float = 5.0
    cache_ttl: float = 300.0
    cache_size: int = 10000
    tier_claim: str | None = None
    audience: tuple[str, ...] = ()

    @classmethod
    def parse(cls, s: Section) -> OAuth2Config:
        url = _url(s, "introspection_url", required=True)
        client_id = s.string("client_id")
        secret = s.secret("client_secret")
        value = cls(
            introspection_url=str(url),
            client_id=client_id,
            client_secret=secret or Secret(""),
            timeout=s.duration("timeout", 5.0, min=0.05, max=60),
            cache_ttl=s.duration("cache_ttl", 300.0, min=0, max=86400),
            cache_size=s.integer("cache_size", 10000, min=1, max=10_000_000),
            tier_claim=s.string("tier_claim", None),
            audience=_str_or_list(s, "audience"),
        )
        if secret is None:
            raise ConfigError(s.at("client_secret"), "is empty (is the environment variable set?)")
        return value


@attrs.frozen
class AuthConfig:
    enabled: bool = False
    type: str = API_KEY
    keys: tuple[ApiKey, ...] = ()
    rotation_period: float | None = None
    notification_before: float = 7 * 86400.0
    jwt: JwtConfig | None = None
    oauth2: OAuth2Config | None = None

    @classmethod
    def parse(cls, root: Section) -> AuthConfig:
        security = root.section("security")
        auth, rotation = security.section("auth"), security.section("api_keys")
        enabled = auth.enabled(False)
        kind = auth.string("type", API_KEY, choices=TYPES)
        keys = _keys(auth, "api_keys", enabled) + _keys(rotation, "keys", enabled)
        _check_unique(keys, security.path)
        jwt = JwtConfig.parse(auth.section(JWT)) if enabled and kind == JWT else None
        oauth2 = OAuth2Config.parse(auth.section(OAUTH2)) if enabled and kind == OAUTH2 else None
        for other in (JWT, OAUTH2):
            if other != kind and auth.raw(other, None) is not None and enabled:
                raise ConfigError(auth.at(other), f"only used when type is {other}")
        if enabled and kind != API_KEY and keys:
            where = auth.at("api_keys") if auth.raw("api_keys", None) else rotation.at("keys")
            raise ConfigError(where, f"API keys are not checked when security.auth.type is {kind}")
        if enabled and kind == API_KEY and not keys:
            raise ConfigError(auth.at("api_keys"), "at least one key is required when type is api_key")
        if keys and "auth" not in security.data:
            raise ConfigError(rotation.at("keys"),
                              "keys are only checked with security.auth enabled and type api_key")
        rotation_period = rotation.duration("rotation_period", None, min=60)
        notification_before = rotation.duration("notification_before", 7 * 86400.0)
        if not enabled:
            # A switched-off section is accepted as it stands (like any `enabled: false` section).
            _ignore_subtree(auth.section(JWT))
            _ignore_subtree(auth.section(OAUTH2))
            return cls(enabled=False, type=kind)
        return cls(
            enabled=True,
            type=kind,
            keys=keys,
            rotation_period=rotation_period,
            notification_before=notification_before,
            jwt=jwt,
            oauth2=oauth2,
        )


def _ignore_subtree(s: Section) -> None:
    for key in list(s.keys()):
        s.raw(key, None)


def _keys(s: Section, key: str, enabled: bool) -> tuple[ApiKey, ...]:
    base = "auth" if s.path.endswith(".auth") else "rotation"
    parsed = s.items(key, lambda item, path: _key(item, path, base, enabled))
    return tuple(k for k in parsed if k is not None)


def _key(item: Any, path: str, base: str, enabled: bool) -> ApiKey | None:
    s = Section(item, path)
    name = s.string("name", None)
    key_id = s.string("id", name if base == "auth" else None)
    fields = {
        "name": name,
        "tier": s.string("tier", "default"),
        "user_id": s.string("user_id", None),
        "rate_limit": s.integer("rate_limit", None, min=1),
        "allowed_ips": s.items("allowed_ips", parse_network),
        "expires": _date(s, "expires", end_of_day=True),
        "created": _date(s, "created", end_of_day=False),
    }
    s.raw("key", None), s.raw("key_sha256", None)  # asked for, so done() names other typos first
    s.done()
    digest = _digest(s, enabled)
    if key_id is None:
        key_id = f"{base}-key-{path.rsplit('[', 1)[-1].rstrip(']')}"
    if not _ID.match(key_id):
        raise ConfigError(s.at("id"), "use letters, digits and . _ : @ - (at most 64 characters)")
    if digest is None:
        return None
    return ApiKey(id=key_id, sha256=Secret(digest.hex()), **fields)


def _digest(s: Section, enabled: bool) -> bytes | None:
    has_key, has_digest = s.raw("key", None) is not None, s.raw("key_sha256", None) is not None
    if has_key == has_digest:
        raise ConfigError(s.path, "exactly one of key and key_sha256 is required")
    if has_digest:
        value = s.string("key_sha256")
        if not _HEX64.match(value):
            raise ConfigError(s.at("key_sha256"), "expected 64 hexadecimal digits (ccproxy keys generate)")
        return bytes.fromhex(value)
    secret = s.secret("key")
    if secret is None:
        if enabled:
            raise ConfigError(s.at("key"), "is empty (is the environment variable set?)")
        return None
    if len(secret.reveal()) < MIN_KEY_LENGTH:
        raise ConfigError(s.at("key"), f"must be at least {MIN_KEY_LENGTH} characters long")
    return secret.digest()


def _date(s: Section, key: str, *, end_of_day: bool) -> float | None:
    """A date (`2026-01-31`, UTC) or an RFC 3339 time. A bare expiry date is valid through that day."""
    value = s.raw(key, None)
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        try:
            if len(text) == 10:
                value = datetime.date.fromisoformat(text)
            else:
                value = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise ConfigError(s.at(key), f"expected a date such as 2026-01-31, got {text!r}") from None
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.UTC)
        return value.timestamp()
    if isinstance(value, datetime.date):
        day = datetime.datetime(value.year, value.month, value.day, tzinfo=datetime.UTC)
        if end_of_day:
            day += datetime.timedelta(days=1)
        return day.timestamp()
    raise ConfigError(s.at(key), f"expected a date such as 2026-01-31, got {value!r}")


def _check_unique(keys: tuple[ApiKey, ...], path: str) -> None:
    ids: set[str] = set()
    digests: set[str] = set()
    for key in keys:
        if key.id in ids:
            raise ConfigError(path, f"key id {key.id!r} is used twice")
        if key.sha256.reveal() in digests:
            raise ConfigError(path, f"key {key.id!r} has the same value as another key")
        ids.add(key.id)
        digests.add(key.sha256.reveal())


def _str_or_list(s: Section, key: str) -> tuple[str, ...]:
    value = s.raw(key, None)
    if value is None:
        return ()
    if isinstance(value, str):
        return (s.string(key),)
    return s.str_list(key)


def _url(s: Section, key: str, required: bool = False) -> str | None:
    value = s.string(key) if required else s.string(key, None)
    if value is None:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConfigError(s.at(key), f"expected an https URL, got {value!r}")
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise ConfigError(s.at(key), "must be https (plain http only to a loopback address)")
    return str(value)


def load_public_key(path: str, where: str) -> Any:
    """A PEM public key (or certificate) as a cryptography key object."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(where, f"cannot read {path}: {e.strerror}") from None
    try:
        if b"BEGIN CERTIFICATE" in data:
            return x509.load_pem_x509_certificate(data).public_key()
        return load_pem_public_key(data)
    except ValueError:
        raise ConfigError(where, f"{path} is not a PEM public key or certificate") from None
