"""The rate-limit headers each API's SDK understands."""

from __future__ import annotations

import math
from datetime import UTC, datetime

from ccproxy.errors import OPENAI
from ccproxy.limits._core import EPS, Decision


def whole_seconds(seconds: float) -> int:
    """Rounded up, never below one: a client told 0 would retry at once and be refused again."""
    return max(1, math.ceil(seconds - EPS))


_last_rfc3339: tuple[int, str] = (0, "")


def rfc3339(when: float) -> str:
    global _last_rfc3339
    second = math.ceil(when - EPS)
    if _last_rfc3339[0] != second:  # most responses in a second share their reset time
        _last_rfc3339 = (second, datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
    return _last_rfc3339[1]


def go_duration(seconds: float) -> str:
    """OpenAI's reset format: `20ms`, `1.5s`, `6m0s`, `1h2m3s`."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{secs:.3f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{int(hours)}h{int(minutes)}m{text}"
    if minutes:
        return f"{int(minutes)}m{text}"
    return text


def rate_headers(api: str, decision: Decision, now: float) -> dict[str, str]:
    """The APIs' own request-limit headers."""
    return _limit_headers(api, decision, now, "requests")


def token_headers(api: str, decision: Decision, now: float) -> dict[str, str]:
    """The APIs' own token-budget headers, from the tightest (or the refusing) token budget."""
    return _limit_headers(api, decision, now, "tokens")


def _limit_headers(api: str, decision: Decision, now: float, unit: str) -> dict[str, str]:
    if decision.limit is None:
        return {}
    limit, remaining = str(decision.limit.count), str(decision.remaining)
    if api == OPENAI:
        headers = {
            f"x-ratelimit-limit-{unit}": limit,
            f"x-ratelimit-remaining-{unit}": remaining,
            f"x-ratelimit-reset-{unit}": go_duration(decision.reset_after),
        }
    else:
        headers = {
            f"anthropic-ratelimit-{unit}-limit": limit,
            f"anthropic-ratelimit-{unit}-remaining": remaining,
            f"anthropic-ratelimit-{unit}-reset": rfc3339(now + decision.reset_after),
        }
    if not decision.allowed:
        headers["retry-after"] = str(whole_seconds(decision.retry_after))
    return headers
