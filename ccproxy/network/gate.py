"""The listener gate: who may open a connection, decided at accept before any TLS work.

Refusing in `buildProtocol` (returning None) makes the port close the socket at once: a listed or
over-cap client costs one accept() and nothing else. Counts move when a connection is made and
when it is lost, however it ends, so they stay exact.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IAddress, IProtocol, IProtocolFactory, ITransport
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure

from ccproxy import events
from ccproxy._compat import HAProxyWrappingFactory
from ccproxy.config.network import NetworkConfig
from ccproxy.http.sockets import no_delay, send_now
from ccproxy.network.addresses import AccessPolicy, NetworkSet, canonical, client_key, parse_ip

log = Logger()
_DONE = Failure(ConnectionDone())
# A blocked client's connection is cut this long after it was asked to close.
CLOSE_GRACE = 1.0


class OpenCount:
    """The open connections of each client key: how many (for the per-client cap) and which (so a
    block can close them). A key with none left is forgotten: the table holds live clients only,
    however many have come and gone."""

    __slots__ = ("_open",)

    def __init__(self) -> None:
        self._open: dict[str, set[Any]] = {}

    def __getitem__(self, key: str) -> int:
        return len(self._open.get(key, ()))

    def __len__(self) -> int:
        return len(self._open)

    def __contains__(self, key: object) -> bool:
        return key in self._open

    def items(self) -> list[tuple[str, int]]:
        return [(key, len(conns)) for key, conns in self._open.items()]

    def connections(self, key: str | None = None) -> list[Any]:
        """The open connections of `key`, or of every client."""
        if key is not None:
            return list(self._open.get(key, ()))
        return [conn for conns in self._open.values() for conn in conns]

    def add(self, key: str, conn: object) -> None:
        self._open.setdefault(key, set()).add(conn)

    def remove(self, key: str, conn: object) -> None:
        conns = self._open.get(key)
        if conns is not None:
            conns.discard(conn)
            if not conns:
                del self._open[key]


class _Policies:
    """The compiled allow/deny lists of one NetworkConfig, rebuilt only when the config changes."""

    def __init__(self) -> None:
        self._config: NetworkConfig | None = None
        self.access = AccessPolicy(NetworkConfig().whitelist, NetworkConfig().blacklist)
        self.trusted = NetworkSet(())

    def update(self, config: NetworkConfig) -> _Policies:
        if config is not self._config:
            self._config = config
            self.access = AccessPolicy(config.whitelist, config.blacklist)
            self.trusted = NetworkSet(config.trusted_proxies)
        return self


class Gate(WrappingFactory):
    """Wraps the TLS (or plain) factory; every connection passes `buildProtocol` here first."""

    protocol = ProtocolWrapper

    def __init__(self, wrapped: IProtocolFactory, holder: Any, clock: Any) -> None:
        super().__init__(wrapped)
        self.holder = holder
        self.clock = clock
        self.total = 0
        # Connections closed since start (the service hands their memory back after a burst).
        self.closed_count = 0
        self.per_ip = OpenCount()
        self.refused: Counter[str] = Counter()
        self.policies = _Policies()
        # For `server.proxy_protocol: true`: the PROXY header is read first, then the client it names
        # is checked by a `_ProxiedCheck` before any byte reaches TLS.
        self.proxied = HAProxyWrappingFactory(_ProxiedCheckFactory(self, wrapped))
        holder.current.deps.blocklist.listeners.append(self.close_blocked)

    def close_blocked(self, target: Any) -> None:
        """Close the open connections of a newly blocked address or range (`str` or ip_network):
        a kept-alive connection must not go on answering 401/429 to a blocked client."""
        if isinstance(target, str):
            hosts = [target] if target in self.per_ip else []
        else:
            hosts = [h for h, _ in self.per_ip.items() if (a := parse_ip(h)) is not None and a.version == target.version
                     and a in target]
        for host in hosts:
            for conn in self.per_ip.connections(host):
                conn.close_soon(self.clock)

    def close_all(self) -> None:
        for conn in self.per_ip.connections():
            conn.close_soon(self.clock)

    def config(self) -> NetworkConfig:
        network: NetworkConfig = self.holder.current.config.network
        return network

    def buildProtocol(self, addr: IAddress | None) -> Any:
        config = self.config()
        host = canonical(getattr(addr, "host", ""))
        if config.proxy_protocol:
            reason = self._proxy_refusal(config, host)
        else:
            reason = self.refusal(config, host)
        if reason is not None:
            self.refuse(reason, host, config)
            return None
        inner = (self.proxied if config.proxy_protocol else self.wrappedFactory).buildProtocol(addr)
        if inner is None:
            return None
        wrapper = _Counted(self, inner, client_key(host, config.ddos.ipv6_prefix), count_ip=not config.proxy_protocol)
        return wrapper

    def refusal(self, config: NetworkConfig, host: str, *, per_ip: bool = True, total: bool = True) -> str | None:
        key = client_key(host, config.ddos.ipv6_prefix)
        if self.holder.current.deps.blocklist.is_blocked(key, self.clock.seconds()):
            return "ip_auto_blocked"
        reason = self.policies.update(config).access.refusal(parse_ip(host))
        if reason is not None:
            return reason
        caps = config.ddos
        if total and caps.max_connections is not None and self.total >= caps.max_connections:
            return "too_many_connections"
        if per_ip and caps.max_connections_per_ip is not None and self.per_ip[key] >= caps.max_connections_per_ip:
            return "too_many_connections_per_ip"
        return None

    def _proxy_refusal(self, config: NetworkConfig, peer: str) -> str | None:
        # The peer is a load balancer: only the total cap applies to it, and only a trusted one
        # (when trusted_proxies is set) may speak for others.
        trusted = self.policies.update(config).trusted
        if trusted and not trusted.contains(parse_ip(peer)):
            return "untrusted_proxy"
        caps = config.ddos
        if caps.max_connections is not None and self.total >= caps.max_connections:
            return "too_many_connections"
        return None

    def refuse(self, reason: str, host: str, config: NetworkConfig) -> None:
        self.refused[reason] += 1
        fields: dict[str, Any] = {"reason": reason, "ip_address": host}
        if reason == "too_many_connections":
            fields["limit"] = config.ddos.max_connections
        elif reason == "too_many_connections_per_ip":
            fields["limit"] = config.ddos.max_connections_per_ip
        events.emit("connection_refused", "warning", **fields)

    def opened(self, host: str | None, conn: _Counted) -> None:
        self.total += 1
        if host is not None:
            self.per_ip.add(host, conn)

    def closed(self, host: str | None, conn: _Counted) -> None:
        self.total -= 1
        self.closed_count += 1
        if host is not None:
            self.per_ip.remove(host, conn)

    def registerProtocol(self, p: Any) -> None:
        # Counting happens in _Counted; WrappingFactory's own registry would only cost memory.
        return None

    def unregisterProtocol(self, p: Any) -> None:
        return None


class _Counted(ProtocolWrapper):
    """Holds one slot of the connection counts from connectionMade to connectionLost."""

    def __init__(self, gate: Gate, wrapped: IProtocol, host: str, count_ip: bool) -> None:
        super().__init__(gate, wrapped)  # type: ignore[arg-type]
        self.gate = gate
        self.host = host if count_ip else None
        self.counted = False

    def makeConnection(self, transport: ITransport) -> None:
        self.gate.opened(self.host, self)
        self.counted = True
        no_delay(transport)
        super().makeConnection(transport)

    def write(self, data: bytes) -> None:
        send_now(self.transport, data)

    def close_soon(self, clock: Any) -> None:
        _close_soon(self, clock)

    def writeSequence(self, data: Any) -> None:
        send_now(self.transport, b"".join(data))

    def connectionLost(self, reason: Failure = _DONE) -> None:
        if self.counted:
            self.counted = False
            self.gate.closed(self.host, self)
        super().connectionLost(reason)


def _close_soon(conn: ProtocolWrapper, clock: Any) -> None:
    """Close after this reactor turn (a refusal being written goes out first), and cut the
    connection a second later if the client does not read what is left."""
    transport: Any = conn.transport
    if transport is None:
        return
    clock.callLater(0, transport.loseConnection)

    def cut() -> None:
        # Behind a PROXY header the transport is a wrapper: cut the socket beneath it.
        t = transport
        while t is not None and not hasattr(t, "abortConnection"):
            t = getattr(t, "transport", None)
        if t is not None and getattr(t, "connected", False):
            t.abortConnection()

    clock.callLater(CLOSE_GRACE, cut)


class _ProxiedCheckFactory(WrappingFactory):
    """Behind the PROXY header parser: checks the client the header names, at its first byte."""

    protocol = ProtocolWrapper

    def __init__(self, gate: Gate, wrapped: IProtocolFactory) -> None:
        super().__init__(wrapped)
        self.gate = gate

    def buildProtocol(self, addr: IAddress | None) -> Any:
        inner = self.wrappedFactory.buildProtocol(addr)
        return None if inner is None else _ProxiedCheck(self, inner)

    def registerProtocol(self, p: Any) -> None:
        return None

    def unregisterProtocol(self, p: Any) -> None:
        return None


class _ProxiedCheck(ProtocolWrapper):
    def __init__(self, factory: _ProxiedCheckFactory, wrapped: IProtocol) -> None:
        super().__init__(factory, wrapped)  # type: ignore[arg-type]
        self.gate = factory.gate
        self.host: str | None = None
        self.checked = False

    def dataReceived(self, data: bytes) -> None:
        if not self.checked:
            self.checked = True
            assert self.transport is not None
            host = canonical(getattr(self.transport.getPeer(), "host", ""))
            config = self.gate.config()
            reason = self.gate.refusal(config, host, total=False)
            if reason is not None:
                self.gate.refuse(reason, host, config)
                self.transport.abortConnection()  # type: ignore[attr-defined]
                return
            self.host = client_key(host, config.ddos.ipv6_prefix)
            self.gate.per_ip.add(self.host, self)
        super().dataReceived(data)

    def close_soon(self, clock: Any) -> None:
        _close_soon(self, clock)

    def connectionLost(self, reason: Failure = _DONE) -> None:
        if self.host is not None:
            host, self.host = self.host, None
            self.gate.per_ip.remove(host, self)
        super().connectionLost(reason)
