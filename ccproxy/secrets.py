"""Secrets stay wrapped: their repr, str and every log line show only a mask."""

from __future__ import annotations

import hashlib
import hmac

_PREFIXES = ("sk-ant-admin01-", "sk-ant-api03-", "sk-ant-", "sk-proj-", "sk-svcacct-", "sk-", "AKIA", "eyJ")


def mask(value: str) -> str:
    """A recognisable but useless form of a secret: `sk-ant-…f3a9`.

    The known prefix (which says what kind of key it is) and the last four characters are kept
    only when the secret is long enough that they give nothing useful away.
    """
    if len(value) < 16:
        return "…" if len(value) < 8 else f"…{value[-2:]}"
    prefix = next((p for p in _PREFIXES if value.startswith(p)), "")
    prefix = prefix[:7]
    return f"{prefix}…{value[-4:]}"


class Secret:
    """A string that must never be printed: only `reveal()` gives it back."""

    __slots__ = ("_digest", "_value")

    def __init__(self, value: str) -> None:
        self._value = value
        # Secrets sit inside config values used as dict keys on the request path: hash once.
        self._digest = hashlib.sha256(value.encode()).digest()

    def reveal(self) -> str:
        return self._value

    def masked(self) -> str:
        return mask(self._value)

    def digest(self) -> bytes:
        return self._digest

    def __repr__(self) -> str:
        return f"Secret({self.masked()!r})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and hmac.compare_digest(self.digest(), other.digest())

    def __hash__(self) -> int:
        return hash(self.digest())
