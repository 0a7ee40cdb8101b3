"""Who may call: `security.auth` and `security.api_keys`."""

from __future__ import annotations

import attrs

from ccproxy.config._reader import Section


@attrs.frozen
class AuthConfig:
    enabled: bool = False

    @classmethod
    def parse(cls, root: Section) -> AuthConfig:
        security = root.section("security")
        security.unbuilt("auth")
        security.unbuilt("api_keys")
        return cls()
