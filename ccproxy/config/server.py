"""`server:` and `upstreams:`: where ccproxy listens and where it forwards to."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

import attrs

from ccproxy.config._reader import ConfigError, Section
from ccproxy.config._tls_names import check_groups, check_suites
from ccproxy.secrets import Secret

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8443


@attrs.frozen
class TLSConfig:
    enabled: bool = True
    cert_file: str | None = None
    key_file: str | None = None
    min_version: str = "1.2"
    cipher_suites: tuple[str, ...] = ()
    # Create a self-signed certificate at cert_file/key_file when they are missing (loopback only).
    self_signed: bool = False
    # Key-exchange groups, most preferred first; empty for the defaults (see _tls_names).
    groups: tuple[str, ...] = ()

    @classmethod
    def parse(cls, s: Section, host: str) -> TLSConfig:
        enabled = s.enabled(True)
        self_signed = s.boolean("self_signed", False)
        cert = s.file("cert_file", None)
        key = s.file("key_file", None)
        min_version = _tls_version(s)
        suites = s.str_list("cipher_suites", ())
        groups = s.str_list("groups", ())
        if enabled and (cert is None or key is None):
            raise ConfigError(s.path, "cert_file and key_file are required when TLS is enabled")
        if self_signed and not is_loopback(host):
            raise ConfigError(s.at("self_signed"), "only allowed when server.host is a loopback address")
        check_suites(suites, min_version, s.at("cipher_suites"))
        check_groups(groups, s.at("groups"))
        return cls(enabled, cert, key, min_version, suites, self_signed, groups)


@attrs.frozen(cache_hash=True)  # a dict key on the request path
class UpstreamConfig:
    name: str
    base_url: str
    api_key: Secret | None
    connect_timeout: float = 10.0
    read_timeout: float = 600.0
    ca_file: str | None = None

    @classmethod
    def parse(cls, s: Section, name: str, default_url: str) -> UpstreamConfig:
        url = s.string("base_url", default_url).rstrip("/")
        parts = urlsplit(url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ConfigError(s.at("base_url"), f"expected an http(s) URL, got {url!r}")
        if parts.query or parts.fragment:
            raise ConfigError(s.at("base_url"), "must not carry a query string or fragment")
        value = cls(
            name=name,
            base_url=url,
            api_key=s.secret("api_key", None),
            connect_timeout=s.duration("connect_timeout", 10.0, min=0.001, max=3600),
            read_timeout=s.duration("read_timeout", 600.0, min=0.001, max=86400),
            ca_file=s.file("ca_file", None),
        )
        return value


@attrs.frozen
class UpstreamsConfig:
    anthropic: UpstreamConfig
    openai: UpstreamConfig

    @classmethod
    def parse(cls, s: Section) -> UpstreamsConfig:
        value = cls(
            anthropic=UpstreamConfig.parse(s.section("anthropic"), "anthropic", "https://api.anthropic.com"),
            openai=UpstreamConfig.parse(s.section("openai"), "openai", "https://api.openai.com"),
        )
        return value


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _tls_version(s: Section) -> str:
    # YAML reads an unquoted 1.2 as a number; both spellings mean the same.
    value = s.raw("min_version", "1.2")
    if isinstance(value, float) and not isinstance(value, bool):
        value = str(value)
    if value not in ("1.2", "1.3"):
        raise ConfigError(s.at("min_version"), f"must be 1.2 or 1.3, got {value!r}")
    return str(value)


@attrs.frozen
class ServerConfig:
    host: str
    port: int
    tls: TLSConfig
    # At shutdown, how long requests and streams under way may run on before they are cut
    # (ccproxy.drain). The systemd unit's TimeoutStopSec must be longer.
    drain_timeout: float = 30.0
    workers: int = 1  # processes serving the listening socket (see ccproxy.workers)

    @classmethod
    def parse(cls, s: Section) -> ServerConfig:
        from ccproxy.config.workers import parse_workers

        host = s.string("host", DEFAULT_HOST)
        port = s.integer("port", DEFAULT_PORT, min=0, max=65535)
        drain = s.duration("drain_timeout", 30.0, min=0, max=3600)
        return cls(host=host, port=port, tls=TLSConfig.parse(s.section("tls"), host), drain_timeout=drain,
                   workers=parse_workers(s))
