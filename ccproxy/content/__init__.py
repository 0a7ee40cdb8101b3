"""What goes in and what comes out: request validation, content filtering and response masking.

The layer lives in `ccproxy.content.layer`; it is imported when built, because the config package
imports the masking modules here to check patterns while it loads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ccproxy.config import Config
    from ccproxy.context import Layer


def build_layer(config: Config, deps: Any, previous: Layer | None) -> Layer:
    """`deps` is a ccproxy.runtime.Deps (reactor, blocklist); the layer keeps no state to carry over."""
    from ccproxy.content.layer import ContentLayer

    # Token usage is read from replies only where something uses it: access records, token budgets.
    audit, limits = config.audit, config.limits
    logs_access = audit.enabled and any(output.records == "access" for output in audit.outputs)
    budgets = limits.enabled and any(t.tokens_per_minute or t.daily_token_quota for t in limits.per_key)
    return ContentLayer(config.content, count_usage=bool(logs_access or budgets))
