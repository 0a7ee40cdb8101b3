"""Belt and braces before a record is written: no secret, and (with GDPR anonymisation) no full IP."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from collections.abc import Iterable
from typing import Any

import attrs

from ccproxy.secrets import Secret, mask

# Shapes of credentials that must never reach a log, whatever an emitter passed by mistake.
_TOKEN_PATTERNS = (
    r"\b(?:sk|rk|pk)-[A-Za-z0-9_\-]{12,}",  # Anthropic / OpenAI style keys
    r"\beyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]*",  # JWTs
    r"\bAKIA[0-9A-Z]{16}\b",  # AWS access key ids
    r"\bgh[pousr]_[A-Za-z0-9]{20,}",  # GitHub tokens
    r"\bxox[abprs]-[A-Za-z0-9\-]{10,}",  # Slack tokens
)
_TOKEN_RE = re.compile("|".join(_TOKEN_PATTERNS))
# "Bearer <anything>" and "api_key=<anything>": the value is hidden whatever it looks like.
_LABELLED = (r"\b(bearer|basic|x-api-key|api[_-]?key|authorization|password|secret|token)(\s*[:=]\s*|\s+)"
             r"([^\s,;\"']{6,})")
_LABELLED_RE = re.compile(_LABELLED, re.IGNORECASE)
_IPV4_RE = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])")
_IPV6_RE = re.compile(r"(?<![0-9A-Fa-f:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f.]{0,15}(?![0-9A-Fa-f:])")

# Fields that are addresses by name: anonymised even when they do not parse as one.
IP_FIELDS = frozenset({"ip_address", "client_ip", "ip", "peer", "remote_ip", "source_ip"})
MAX_STRING = 2048


class Scrubber:
    """Replaces configured secrets and credential-shaped strings by masks."""

    def __init__(self, secrets: Iterable[str]) -> None:
        known = sorted({s for s in secrets if len(s) >= 8}, key=len, reverse=True)
        self._known = re.compile("|".join(re.escape(s) for s in known)) if known else None
        # One pass to tell the common case (nothing to hide) from the rest.
        parts = [f"(?i:{_LABELLED})", _TOKEN_RE.pattern, *([self._known.pattern] if self._known else [])]
        self._any = re.compile("|".join(parts))
        self._clean: dict[str, bool] = {}

    def text(self, value: str) -> str:
        known = self._clean.get(value)
        if known is not None:
            return value
        if len(value) > MAX_STRING:
            value = value[:MAX_STRING] + "…"
        if self._any.search(value) is None:
            if len(value) <= 256:  # methods, paths, ids and reasons repeat: remember the clean ones
                if len(self._clean) >= 4096:
                    self._clean.clear()
                self._clean[value] = True
            return value
        if self._known is not None:
            value = self._known.sub(lambda m: mask(m.group(0)), value)
        value = _LABELLED_RE.sub(lambda m: f"{m.group(1)}{m.group(2)}{mask(m.group(3))}", value)
        return _TOKEN_RE.sub(lambda m: mask(m.group(0)), value)


@attrs.frozen
class Anonymizer:
    """IPv4 to its /24, IPv6 to its /48, or both to a keyed hash."""

    method: str = "truncate"
    key: bytes = b""

    def address(self, value: str) -> str:
        if "/" in value:
            # An IPv6 client's network, as limits and blocks key it: anonymised as its first address.
            try:
                network = ipaddress.ip_network(value, strict=False)
            except ValueError:
                return value
            return f"{self.address(str(network.network_address))}/{network.prefixlen}"
        try:
            ip = ipaddress.ip_address(value.strip("[]"))
        except ValueError:
            return value
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if self.method == "hash":
            return "iphash:" + hmac.new(self.key, ip.packed, hashlib.sha256).hexdigest()[:16]
        prefix = 24 if ip.version == 4 else 48
        return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False).network_address)

    def text(self, value: str) -> str:
        value = _IPV4_RE.sub(lambda m: self.address(m.group(0)), value)
        return _IPV6_RE.sub(lambda m: self.address(m.group(0)), value)


def config_secrets(config: Any) -> list[str]:
    """Every Secret anywhere in the config tree, revealed, so records can be checked against them."""
    found: list[str] = []
    _walk(config, found, 0)
    return found


def _walk(value: Any, found: list[str], depth: int) -> None:
    if depth > 12:
        return
    if isinstance(value, Secret):
        found.append(value.reveal())
    elif attrs.has(type(value)):
        for field in attrs.fields(type(value)):
            _walk(getattr(value, field.name), found, depth + 1)
    elif isinstance(value, dict):
        for item in value.values():
            _walk(item, found, depth + 1)
    elif isinstance(value, list | tuple | set | frozenset):
        for item in value:
            _walk(item, found, depth + 1)
