"""The operator's side: `admin` (control socket, state directory, metrics listener) and
`security.emergency` (the strict profile `ccproxy security emergency --enable` switches on).

See docs/incident-response.md.
"""

from __future__ import annotations

import attrs

from ccproxy.config._reader import ConfigError, Section, parse_network
from ccproxy.config.network import Network

# The systemd unit's RuntimeDirectory=ccproxy and StateDirectory=ccproxy.
DEFAULT_SOCKET = "/run/ccproxy/admin.sock"
DEFAULT_STATE_DIR = "/var/lib/ccproxy"
DEFAULT_METRICS = "127.0.0.1:9464"


@attrs.frozen
class MetricsConfig:
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 9464

    @classmethod
    def parse(cls, section: Section) -> MetricsConfig:
        enabled = section.enabled(False)
        listen = section.string("listen", DEFAULT_METRICS)
        host, port = parse_listen(listen, section.at("listen"))
        return cls(enabled=enabled, host=host, port=port)


def parse_listen(text: str, path: str) -> tuple[str, int]:
    """`HOST:PORT` or `[V6]:PORT`; port 0 picks a free one (tests)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(path, f"expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    number = int(port)
    if number > 65535:
        raise ConfigError(path, f"port must be at most 65535, got {number}")
    return host, number


@attrs.frozen
class AdminConfig:
    """`admin:` everything an operator reaches off the public listener."""

    # The control socket `ccproxy security ...` talks to; None: no socket (`socket: null` is refused,
    # `enabled: false` turns it off).
    socket: str | None = DEFAULT_SOCKET
    # Blocks, emergency state and rotated keys are kept here across restarts.
    state_dir: str = DEFAULT_STATE_DIR
    metrics: MetricsConfig = MetricsConfig()

    @classmethod
    def parse(cls, root: Section) -> AdminConfig:
        section = root.section("admin")
        enabled = section.enabled(True)
        socket = section.file("socket", DEFAULT_SOCKET)
        state_dir = section.file("state_dir", DEFAULT_STATE_DIR)
        metrics = MetricsConfig.parse(section.section("metrics"))
        return cls(socket=socket if enabled else None, state_dir=state_dir, metrics=metrics)


@attrs.frozen
class EmergencyConfig:
    """`security.emergency`: what changes while emergency mode is on (off until switched on)."""

    # Every request must carry a credential ccproxy accepts: with auth off (client credentials
    # passed through), nothing is served.
    require_auth: bool = True
    # When non-empty, only these addresses are served; the others get 403.
    allowed_ips: tuple[Network, ...] = ()
    # When non-empty, only these key ids (API keys, JWT subjects' key ids) are served.
    allowed_keys: tuple[str, ...] = ()
    # Open connections are closed when emergency mode is switched on, so every client meets the
    # profile from its next request, not from its next connection.
    close_connections: bool = True
    # A per-address limit of its own while on (on top of security.rate_limiting); None: none.
    requests_per_minute_per_ip: int | None = 60

    @classmethod
    def parse(cls, root: Section) -> EmergencyConfig:
        section = root.section("security").section("emergency")
        limit = section.raw("requests_per_minute_per_ip", 60)
        return cls(
            require_auth=section.boolean("require_auth", True),
            allowed_ips=section.items("allowed_ips", parse_network),
            allowed_keys=section.str_list("allowed_keys", ()),
            close_connections=section.boolean("close_connections", True),
            # false: no limit of its own
            requests_per_minute_per_ip=None if limit is False else section.integer(
                "requests_per_minute_per_ip", 60, min=1, max=1_000_000),
        )
