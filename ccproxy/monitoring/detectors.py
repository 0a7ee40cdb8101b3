"""Named detectors over request text: each a set of RE2 patterns (linear time, whatever the input).

A detector looks at the request target and the raw request body (so, for the JSON APIs, inside the
message texts as sent). A match is reported as a `suspicious_request` event naming the detector;
`monitoring.security_alerts` rules count those events like any other. These are tripwires for
alerting, not a filter: a developer asking a model about SQL injection will match too, so pair
`alert_and_block` with a threshold (`sql_injection_attempt > 3 in 10m`) where that matters.
"""

from __future__ import annotations

from typing import Any

import re2

# The patterns of each detector, documented in docs/incident-response.md. Case-insensitive.
DETECTORS: dict[str, tuple[str, ...]] = {
    "sql_injection_attempt": (
        r"\bunion\s+(?:all\s+)?select\b",
        r"'\s*or\s+'?\d+'?\s*=\s*'?\d+",
        r"'\s*or\s+'[^']*'\s*=\s*'",
        r";\s*drop\s+(?:table|database)\b",
        r"\binformation_schema\b",
        r"\b(?:sleep|benchmark|pg_sleep)\s*\(\s*\d+",
        r"\bxp_cmdshell\b",
    ),
    "prompt_injection_attempt": (
        r"\bignore\s+(?:all\s+|any\s+)?(?:the\s+)?(?:previous|prior|above|earlier)\s+(?:instructions|prompts|rules)",
        r"\bdisregard\s+(?:all\s+|any\s+)?(?:the\s+)?(?:previous|prior|above|system)\s+(?:instructions|prompts|rules)",
        r"<\|im_start\|>|<\|im_end\|>|<\|endoftext\|>",
        r"\byou\s+are\s+now\s+(?:dan|in\s+developer\s+mode)\b",
        r"\b(?:reveal|print|repeat)\s+(?:your\s+|the\s+)?(?:system\s+prompt|hidden\s+instructions)",
    ),
    "command_injection_attempt": (
        r";\s*(?:rm|curl|wget|nc|ncat|bash|sh|python)\s+-",
        r"\$\(\s*(?:curl|wget|bash|sh|nc)\b",
        r"`\s*(?:curl|wget|bash|sh|nc)\b",
        r"\|\s*(?:bash|sh)\s*(?:$|[;&|])",
    ),
    "path_traversal_attempt": (
        r"(?:\.\./|\.\.\\){2,}",
        r"%2e%2e(?:%2f|%5c|/)",
        r"/etc/(?:passwd|shadow)\b",
    ),
}


class Detector:
    """One named detector: its patterns joined into one RE2 program, run once per request."""

    def __init__(self, name: str) -> None:
        self.name = name
        joined = "|".join(f"(?:{p})" for p in DETECTORS[name])
        options = re2.Options()
        options.case_sensitive = False
        options.never_capture = True
        options.encoding = re2.Options.Encoding.LATIN1  # raw bytes, never a decoding error
        self.program: Any = re2.compile(joined.encode("latin-1"), options)

    def matches(self, *texts: bytes) -> bool:
        return any(self.program.search(text) is not None for text in texts if text)
