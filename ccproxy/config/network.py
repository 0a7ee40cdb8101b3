"""Connection and HTTP hardening: `security.ddos_protection`, IP lists, `server.security_headers`,
trusted proxies."""

from __future__ import annotations

import attrs

from ccproxy.config._reader import Section


@attrs.frozen
class NetworkConfig:
    @classmethod
    def parse(cls, root: Section) -> NetworkConfig:
        server, security = root.section("server"), root.section("security")
        for key in ("security_headers", "trusted_proxies", "proxy_protocol"):
            server.unbuilt(key)
        for key in ("ddos_protection", "ip_whitelist", "ip_blacklist"):
            security.unbuilt(key)
        return cls()
