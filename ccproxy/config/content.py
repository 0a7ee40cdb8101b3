"""What goes in and what comes out: `security.request_validation`, `security.response_sanitization`."""

from __future__ import annotations

import attrs

from ccproxy.config._reader import Section


@attrs.frozen
class ContentConfig:
    @classmethod
    def parse(cls, root: Section) -> ContentConfig:
        security = root.section("security")
        security.unbuilt("request_validation")
        security.unbuilt("response_sanitization")
        return cls()
