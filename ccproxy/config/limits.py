"""How much: `security.rate_limiting`, `security.ip_blacklist.auto_block` and `state:`."""

from __future__ import annotations

import attrs

from ccproxy.config._reader import Section


@attrs.frozen
class LimitsConfig:
    enabled: bool = False

    @classmethod
    def parse(cls, root: Section) -> LimitsConfig:
        root.section("security").unbuilt("rate_limiting")
        root.unbuilt("state")
        return cls()
