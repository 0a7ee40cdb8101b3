"""The audit trail: `security.audit` and `privacy.gdpr`."""

from __future__ import annotations

import attrs

from ccproxy.config._reader import Section


@attrs.frozen
class AuditConfig:
    @classmethod
    def parse(cls, root: Section) -> AuditConfig:
        root.section("security").unbuilt("audit")
        root.section("privacy").unbuilt("gdpr")
        return cls()
