"""IP address matching for the allow/deny lists and trusted proxies.

An IPv4-mapped IPv6 address (`::ffff:10.1.2.3`, what a dual-stack socket reports for an IPv4 peer) is
matched as the IPv4 address it carries, so one IPv4 entry covers both spellings.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Sequence

from ccproxy.config.network import IPListConfig, Network

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_ip(text: str) -> Address | None:
    """The address in `text` (IPv4-mapped unwrapped, zone id dropped), or None if it is not one."""
    try:
        addr = ipaddress.ip_address(text.split("%", 1)[0].strip())
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


@functools.lru_cache(maxsize=4096)  # called per request with the same few peers: parse each once
def canonical(text: str) -> str:
    """One spelling per client, so per-IP counts and blocks cannot be split by notation."""
    addr = parse_ip(text)
    return text if addr is None else str(addr)


@functools.lru_cache(maxsize=4096)
def client_key(host: str, ipv6_prefix: int = 64) -> str:
    """Whom per-client caps, limits and blocks count: an IPv4 address itself, an IPv6 address by its
    `/ipv6_prefix` network (`2001:db8::/64`). One IPv6 client normally holds a whole /64, so keying
    on the full address would give it 2**64 fresh identities; `host` is a `canonical` spelling."""
    if ":" not in host or ipv6_prefix >= 128:
        return host
    addr = parse_ip(host)
    if not isinstance(addr, ipaddress.IPv6Address):
        return host
    return str(ipaddress.IPv6Network((addr, ipv6_prefix), strict=False))


class NetworkSet:
    """A set of CIDR ranges, split by family so a lookup only scans ranges that can match."""

    def __init__(self, networks: Iterable[Network]) -> None:
        self.v4 = tuple(n for n in networks if isinstance(n, ipaddress.IPv4Network))
        self.v6 = tuple(n for n in networks if isinstance(n, ipaddress.IPv6Network))

    def __bool__(self) -> bool:
        return bool(self.v4 or self.v6)

    def contains(self, addr: Address | None) -> bool:
        if addr is None:
            return False
        if isinstance(addr, ipaddress.IPv4Address):
            return any(addr in n for n in self.v4)
        return any(addr in n for n in self.v6)


class AccessPolicy:
    """The allow/deny decision for one address: the blacklist always wins."""

    def __init__(self, whitelist: IPListConfig, blacklist: IPListConfig) -> None:
        self.whitelist = NetworkSet(whitelist.ips) if whitelist.enabled else None
        self.blacklist = NetworkSet(blacklist.ips) if blacklist.enabled else None

    def refusal(self, addr: Address | None) -> str | None:
        """The reason to refuse `addr`, or None to let it in."""
        if self.blacklist is not None and self.blacklist.contains(addr):
            return "ip_blacklisted"
        if self.whitelist is not None and not self.whitelist.contains(addr):
            return "not_whitelisted"
        return None


def client_from_forwarded(peer: str, forwarded: Sequence[bytes], trusted: NetworkSet) -> str:
    """The client address behind a chain of proxies: the right-most X-Forwarded-For hop not trusted.

    The header is believed only when the socket peer is itself a trusted proxy; an entry that is not
    an address ends the walk (what lies left of it cannot be trusted), as does running out of hops.
    """
    current = parse_ip(peer)
    if not trusted or not trusted.contains(current):
        return canonical(peer)
    hops = [h.strip() for value in forwarded for h in value.decode("latin-1").split(",")]
    for hop in reversed(hops):
        addr = parse_ip(hop)
        if addr is None:
            break
        current = addr
        if not trusted.contains(addr):
            break
    return str(current) if current is not None else canonical(peer)
