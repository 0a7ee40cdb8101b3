"""Addresses refused at accept until a deadline (automatic, rule or operator blocks); consulted synchronously."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# Told of every new block: a single address (canonical text) or a range.
BlockListener = Callable[[str | Network], None]


class BlockList:
    """ip -> unblock time, plus ranges. The listener checks it before any TLS work, so a single
    address stays O(1); ranges (operator blocks only, few) are scanned only when there are any."""

    def __init__(self) -> None:
        self._until: dict[str, float] = {}
        self._networks: dict[Network, float] = {}
        self.listeners: list[BlockListener] = []

    def block(self, ip: str, until: float) -> None:
        self._until[ip] = max(until, self._until.get(ip, 0.0))
        self._tell(ip)

    def block_network(self, network: Network, until: float) -> None:
        """A whole range; a one-address range is kept as that address."""
        if network.num_addresses == 1:
            self.block(str(network.network_address), until)
            return
        self._networks[network] = max(until, self._networks.get(network, 0.0))
        self._tell(network)

    def unblock(self, ip: str) -> bool:
        return self._until.pop(ip, None) is not None

    def unblock_network(self, network: Network) -> bool:
        if network.num_addresses == 1:
            return self.unblock(str(network.network_address))
        return self._networks.pop(network, None) is not None

    def is_blocked(self, ip: str, now: float) -> bool:
        until = self._until.get(ip)
        if until is not None:
            if until > now:
                return True
            del self._until[ip]
        if self._networks:
            return self._in_network(ip, now)
        return False

    def _in_network(self, ip: str, now: float) -> bool:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        for network, until in list(self._networks.items()):
            if until <= now:
                del self._networks[network]
            elif address.version == network.version and address in network:
                return True
        return False

    def expired(self, now: float) -> list[str]:
        """Drop and return the addresses whose block has run out."""
        gone = [ip for ip, until in self._until.items() if until <= now]
        for ip in gone:
            del self._until[ip]
        return gone

    def _tell(self, target: str | Network) -> None:
        for listener in list(self.listeners):
            listener(target)

    def __len__(self) -> int:
        return len(self._until) + len(self._networks)
