"""The content sections of the seed config (request validation, response sanitization), for tests."""

from __future__ import annotations

import copy
from typing import Any

_SEED: dict[str, Any] = {
    "request_validation": {
        "enabled": True,
        "max_tokens": 100000,
        "max_messages": 100,
        "max_message_length": 50000,
        "blocked_patterns": ["(?i)api[_-]?key", "(?i)password", "<script"],
    },
    "response_sanitization": {
        "enabled": True,
        "remove_system_prompts": True,
        "mask_api_keys": True,
        "mask_emails": True,
        "mask_phone_numbers": True,
        "mask_patterns": [{"name": "credit_card", "pattern": r"\b\d{4}[\s-]?\d{4}[\s-]?\d{4}[\s-]?\d{4}\b",
                           "replacement": "XXXX-XXXX-XXXX-XXXX"}],
    },
}


def seed_content(**request_validation: Any) -> dict[str, Any]:
    """A fresh copy of the seed's two sections, with `request_validation` keys replaced."""
    out = copy.deepcopy(_SEED)
    out["request_validation"].update(request_validation)
    return out
