"""Addresses refused at accept until a deadline (automatic blocking); consulted synchronously."""

from __future__ import annotations


class BlockList:
    """ip -> unblock time. The listener checks it before any TLS work, so it must stay O(1)."""

    def __init__(self) -> None:
        self._until: dict[str, float] = {}

    def block(self, ip: str, until: float) -> None:
        self._until[ip] = max(until, self._until.get(ip, 0.0))

    def unblock(self, ip: str) -> bool:
        return self._until.pop(ip, None) is not None

    def is_blocked(self, ip: str, now: float) -> bool:
        until = self._until.get(ip)
        if until is None:
            return False
        if until <= now:
            del self._until[ip]
            return False
        return True

    def expired(self, now: float) -> list[str]:
        """Drop and return the addresses whose block has run out."""
        gone = [ip for ip, until in self._until.items() if until <= now]
        for ip in gone:
            del self._until[ip]
        return gone

    def __len__(self) -> int:
        return len(self._until)
