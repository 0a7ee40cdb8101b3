"""Connection and HTTP hardening: `security.ddos_protection`, IP lists, `server.security_headers`,
trusted proxies, the PROXY protocol.

`security.ip_blacklist.auto_block` is read by the rate-limit module, not here.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Any

import attrs

from ccproxy.config._reader import ConfigError, Section, join, parse_network

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# With `ddos_protection.enabled: false` the sizes fall back to these ceilings (never unbounded):
# Anthropic's own request limit, and a head no real client comes near.
CEILING_REQUEST_SIZE = 32 * 1024 * 1024
CEILING_HEADER_SIZE = 64 * 1024

# The seed's set. None of them changes how an API client reads a JSON or SSE response.
DEFAULT_SECURITY_HEADERS: tuple[tuple[str, str], ...] = (
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("X-XSS-Protection", "1; mode=block"),
    ("Strict-Transport-Security", "max-age=31536000; includeSubDomains"),
    ("Content-Security-Policy", "default-src 'self'"),
    ("Referrer-Policy", "strict-origin-when-cross-origin"),
)

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# A header value: visible ASCII, space and tab; nothing that could end the line.
_FIELD_VALUE = re.compile(r"^[\t\x20-\x7e]*$")
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
# Headers that frame the message or carry identity: a config must not be able to set them.
_FORBIDDEN_HEADERS = frozenset(
    {"content-length", "transfer-encoding", "connection", "host", "content-type", "request-id", "set-cookie",
     "keep-alive", "upgrade", "trailer", "te"}
)


# The default body budget never goes below this, however small the machine: a few large requests fit.
_BUDGET_FLOOR = 64 * 1024 * 1024


def machine_budget() -> int:
    """A quarter of the memory this process may use: the machine's, or its cgroup's if lower."""
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        memory = 1 << 30
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            memory = min(memory, int(limit))
    except OSError:
        pass
    return max(_BUDGET_FLOOR, memory // 4)


MACHINE_BUDGET = machine_budget()


@attrs.frozen
class DDoSConfig:
    enabled: bool = True
    max_connections: int | None = 10000
    max_connections_per_ip: int | None = 100
    max_request_size: int = 10 * 1024 * 1024
    max_header_size: int = 8192
    # Deadlines, in seconds; None means no deadline.
    header_timeout: float | None = 10.0
    read_timeout: float | None = 30.0
    tls_handshake_timeout: float | None = 10.0
    idle_timeout: float | None = 75.0
    # How long a client may take none of a response it is sent before the connection is cut.
    send_timeout: float | None = 60.0
    # Request bodies (and response bodies buffered for masking) held at once, all connections together.
    max_buffered_bytes: int = MACHINE_BUDGET
    # IPv6 clients are counted, limited and blocked by their network of this prefix length.
    ipv6_prefix: int = 64

    @classmethod
    def parse(cls, s: Section) -> DDoSConfig:
        enabled = s.enabled(True)
        d = cls()
        max_conn = s.integer("max_connections", d.max_connections, min=1, max=10_000_000)
        per_ip = s.integer("max_connections_per_ip", d.max_connections_per_ip, min=1, max=10_000_000)
        request_size = s.size("max_request_size", d.max_request_size, min=1, max=CEILING_REQUEST_SIZE)
        header_size = s.size("max_header_size", d.max_header_size, min=256, max=CEILING_HEADER_SIZE)
        header_timeout = _deadline(s, "header_timeout", d.header_timeout)
        read_timeout = _deadline(s, "read_timeout", d.read_timeout)
        handshake = _deadline(s, "tls_handshake_timeout", d.tls_handshake_timeout)
        idle = _deadline(s, "idle_timeout", d.idle_timeout)
        send = _deadline(s, "send_timeout", d.send_timeout)
        buffered = s.size("max_buffered_bytes", d.max_buffered_bytes, min=1024 * 1024, max=1 << 50)
        prefix = s.integer("ipv6_prefix", d.ipv6_prefix, min=1, max=128)
        if not enabled:
            # Off: no caps and no request deadlines; sizes keep their hard ceilings. The handshake,
            # keep-alive and send timers stay: they only reclaim connections nobody is using; the
            # buffer budget stays at the machine's default (memory is never unbounded).
            return cls(False, None, None, CEILING_REQUEST_SIZE, CEILING_HEADER_SIZE, None, None, handshake, idle, send,
                       d.max_buffered_bytes, prefix)
        if max_conn is not None and per_ip is not None and per_ip > max_conn:
            raise ConfigError(s.at("max_connections_per_ip"), "cannot exceed max_connections")
        return cls(True, max_conn, per_ip, request_size, header_size, header_timeout, read_timeout, handshake, idle,
                   send, buffered, prefix)


def _deadline(s: Section, key: str, default: float | None) -> float | None:
    value = s.duration(key, default, min=0.001, max=86400)
    return None if value is None else float(value)


@attrs.frozen
class IPListConfig:
    enabled: bool = False
    ips: tuple[Network, ...] = ()

    @classmethod
    def parse(cls, s: Section, *, refuse_empty: bool) -> IPListConfig:
        # A list written out without `enabled` is meant to apply: never ignore it silently.
        enabled = s.enabled("ips" in s.data)
        ips = s.items("ips", _parse_ip_entry)
        if enabled and refuse_empty and not ips:
            raise ConfigError(s.at("ips"), "the whitelist is enabled but lists nothing: every client would be refused")
        return cls(enabled, ips if enabled else ())


def _parse_ip_entry(value: Any, path: str) -> Network:
    net = parse_network(value, path)
    return unmap_network(net)


def unmap_network(net: Network) -> Network:
    """`::ffff:10.0.0.0/104` is the IPv4 range 10.0.0.0/8: store it as such so both forms match."""
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96 and net.subnet_of(_MAPPED):
        mapped = net.network_address.ipv4_mapped
        assert mapped is not None
        return ipaddress.IPv4Network(f"{mapped}/{net.prefixlen - 96}")
    return net


@attrs.frozen
class SecurityHeadersConfig:
    enabled: bool = True
    headers: tuple[tuple[str, str], ...] = DEFAULT_SECURITY_HEADERS
    # Replace a header of the same name sent by the upstream; by default the upstream's is kept.
    override_upstream: bool = False

    @classmethod
    def parse(cls, s: Section) -> SecurityHeadersConfig:
        enabled = s.enabled(True)
        override = s.boolean("override_upstream", False)
        raw = s.raw("headers", None)
        headers = DEFAULT_SECURITY_HEADERS if raw is None else _parse_headers(raw, s.at("headers"))
        return cls(enabled, headers if enabled else (), bool(override))

    def lines(self, secure: bool) -> tuple[tuple[bytes, bytes], ...]:
        """The headers every response carries: Strict-Transport-Security only over TLS, where
        it means something (RFC 6797 8.1: a browser ignores it over plain HTTP)."""
        return tuple((name.encode(), value.encode()) for name, value in self.headers
                     if secure or name.lower() != "strict-transport-security")


def _parse_headers(raw: Any, path: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, dict):
        raise ConfigError(path, "expected a mapping of header name to value")
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for name, value in raw.items():
        where = join(path, str(name))
        if not isinstance(name, str) or not _TOKEN.match(name):
            raise ConfigError(where, "not a valid header name")
        if name.lower() in _FORBIDDEN_HEADERS:
            raise ConfigError(where, "this header frames the message or names it and cannot be configured")
        if name.lower() in seen:
            raise ConfigError(where, "named twice (header names are case-insensitive)")
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ConfigError(where, "expected a string value")
        text = str(value).strip()
        if not text or not _FIELD_VALUE.match(text):
            raise ConfigError(where, "must be non-empty printable ASCII on one line (no CR, LF or control bytes)")
        seen.add(name.lower())
        out.append((name, text))
    return tuple(out)


@attrs.frozen
class NetworkConfig:
    ddos: DDoSConfig = DDoSConfig()
    whitelist: IPListConfig = IPListConfig()
    blacklist: IPListConfig = IPListConfig()
    security_headers: SecurityHeadersConfig = SecurityHeadersConfig()
    trusted_proxies: tuple[Network, ...] = ()
    proxy_protocol: bool = False

    @classmethod
    def parse(cls, root: Section) -> NetworkConfig:
        server, security = root.section("server"), root.section("security")
        blacklist = security.section("ip_blacklist")
        return cls(
            ddos=DDoSConfig.parse(security.section("ddos_protection")),
            whitelist=IPListConfig.parse(security.section("ip_whitelist"), refuse_empty=True),
            blacklist=IPListConfig.parse(blacklist, refuse_empty=False),
            security_headers=SecurityHeadersConfig.parse(server.section("security_headers")),
            trusted_proxies=server.items("trusted_proxies", _parse_ip_entry),
            proxy_protocol=bool(server.boolean("proxy_protocol", False)),
        )
