"""IP lists, trusted proxies, the accept gate, security headers and the config keys, in memory."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from ccproxy.blocklist import BlockList
from ccproxy.config import ConfigError, parse
from ccproxy.config.network import DDoSConfig, IPListConfig, NetworkConfig, SecurityHeadersConfig, unmap_network
from ccproxy.http.request import ProxyRequest
from ccproxy.network.addresses import AccessPolicy, NetworkSet, client_from_forwarded, parse_ip
from ccproxy.network.gate import Gate
from ccproxy.network.layer import NetworkLayer
from ccproxy.site import ProxySite
from tests.support.hardening import Conn
from tests.support.requests import FakeRequest


def nets(*cidrs: str) -> tuple[Any, ...]:
    return tuple(unmap_network(ipaddress.ip_network(c)) for c in cidrs)


def policy(white: tuple[str, ...] | None = None, black: tuple[str, ...] = ()) -> AccessPolicy:
    w = IPListConfig(True, nets(*white)) if white is not None else IPListConfig()
    return AccessPolicy(w, IPListConfig(bool(black), nets(*black)))


# -- address matching


@pytest.mark.parametrize(
    ("address", "listed"),
    [
        ("10.1.2.3", True),
        ("::ffff:10.1.2.3", True),  # an IPv4 peer on a dual-stack socket
        ("11.0.0.1", False),
        ("2001:db8::1", True),
        ("2001:db8:0:ffff::9", True),
        ("2001:db9::1", False),
        ("::ffff:192.168.7.7", True),  # listed as ::ffff:192.168.0.0/112
        ("192.169.0.1", False),
        ("fe80::1%eth0", False),
        ("not-an-ip", False),
    ],
)
def test_cidr_matching(address: str, listed: bool) -> None:
    listing = policy(black=("10.0.0.0/8", "2001:db8::/32", "::ffff:192.168.0.0/112"))
    assert (listing.refusal(parse_ip(address)) == "ip_blacklisted") is listed


def test_mapped_network_is_stored_as_ipv4() -> None:
    assert unmap_network(ipaddress.ip_network("::ffff:10.0.0.0/104")) == ipaddress.ip_network("10.0.0.0/8")


def test_blacklist_wins_over_whitelist() -> None:
    p = policy(white=("10.0.0.0/8",), black=("10.9.0.0/16",))
    assert p.refusal(parse_ip("10.1.1.1")) is None
    assert p.refusal(parse_ip("10.9.1.1")) == "ip_blacklisted"
    assert p.refusal(parse_ip("::ffff:10.9.1.1")) == "ip_blacklisted"
    assert p.refusal(parse_ip("172.16.0.1")) == "not_whitelisted"
    assert p.refusal(parse_ip("::1")) == "not_whitelisted"


def test_no_lists_lets_everyone_in() -> None:
    assert policy().refusal(parse_ip("203.0.113.9")) is None


# -- X-Forwarded-For


TRUSTED = NetworkSet(nets("10.0.0.0/8", "fd00::/8"))


@pytest.mark.parametrize(
    ("peer", "xff", "client"),
    [
        ("203.0.113.5", [b"1.2.3.4"], "203.0.113.5"),  # untrusted peer: header ignored
        ("10.0.0.2", [b"1.2.3.4"], "1.2.3.4"),
        ("10.0.0.2", [b"6.6.6.6, 1.2.3.4, 10.0.0.9"], "1.2.3.4"),  # right-most untrusted hop
        ("10.0.0.2", [b"6.6.6.6", b"1.2.3.4"], "1.2.3.4"),  # several header lines
        ("10.0.0.2", [b"10.0.0.7, 10.0.0.8"], "10.0.0.7"),  # all trusted: the left-most
        ("10.0.0.2", [b"1.2.3.4, garbage, 10.0.0.9"], "10.0.0.9"),  # the walk stops at junk
        ("10.0.0.2", [], "10.0.0.2"),
        ("::ffff:10.0.0.2", [b"2001:db8::7"], "2001:db8::7"),
        ("fd00::1", [b"::ffff:1.2.3.4"], "1.2.3.4"),
    ],
)
def test_forwarded_for(peer: str, xff: list[bytes], client: str) -> None:
    assert client_from_forwarded(peer, xff, TRUSTED) == client


class ClientIp(Resource):
    isLeaf = True

    def render(self, request: ProxyRequest) -> bytes:
        return request.client_address().host.encode()  # type: ignore[attr-defined, no-any-return]


def test_request_names_client_behind_trusted_proxy_only() -> None:
    config = NetworkConfig(trusted_proxies=nets("127.0.0.0/8"))
    c = Conn(config, resource=ClientIp()).send(
        b"GET /v1/models HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 198.51.100.7, 127.0.0.5\r\n\r\n"
    )
    assert c.output.endswith(b"198.51.100.7")
    c = Conn(NetworkConfig(), resource=ClientIp()).send(
        b"GET /v1/models HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 198.51.100.7\r\n\r\n"
    )
    assert c.output.endswith(b"127.0.0.1")


# -- the accept gate


@attrs.define
class FakeRuntime:
    config: Any
    deps: Any


class FakeHolder:
    def __init__(self, network: NetworkConfig) -> None:
        self.blocklist = BlockList()
        self.set(network)

    def set(self, network: NetworkConfig) -> None:
        self.current = FakeRuntime(config=attrs.make_class("C", ["network"])(network),
                                   deps=attrs.make_class("D", ["blocklist"])(self.blocklist))


@pytest.fixture
def refused() -> Iterator[list[dict[str, Any]]]:
    found: list[dict[str, Any]] = []

    def observer(event: dict[str, Any]) -> None:
        if event.get("ccproxy_event") == "connection_refused":
            found.append(event)

    globalLogPublisher.addObserver(observer)
    yield found
    globalLogPublisher.removeObserver(observer)


def make_gate(network: NetworkConfig) -> tuple[Gate, FakeHolder, Clock]:
    clock = Clock()
    holder = FakeHolder(network)
    site = ProxySite(ClientIp(), clock)
    return Gate(site, holder, clock), holder, clock


def connect(gate: Gate, host: str) -> Any:
    addr = (IPv6Address if ":" in host else IPv4Address)("TCP", host, 5000)
    proto = gate.buildProtocol(addr)
    if proto is not None:
        proto.makeConnection(StringTransport(peerAddress=addr))
    return proto


def test_total_cap_is_exact_and_counts_drop_on_close(refused: list[dict[str, Any]]) -> None:
    gate, _, _ = make_gate(NetworkConfig(ddos=DDoSConfig(max_connections=3, max_connections_per_ip=3)))
    opened = [connect(gate, f"127.0.0.{i}") for i in range(1, 4)]
    assert all(opened) and gate.total == 3
    assert connect(gate, "127.0.0.9") is None
    assert refused[-1]["reason"] == "too_many_connections" and refused[-1]["limit"] == 3
    opened[0].connectionLost(Failure(Exception("gone")))
    assert gate.total == 2 and connect(gate, "127.0.0.9") is not None


def test_per_ip_cap_keyed_on_host_in_any_notation(refused: list[dict[str, Any]]) -> None:
    gate, _, _ = make_gate(NetworkConfig(ddos=DDoSConfig(max_connections=10, max_connections_per_ip=2)))
    assert connect(gate, "127.0.0.1") and connect(gate, "::ffff:127.0.0.1")
    assert connect(gate, "127.0.0.1") is None
    assert refused[-1]["reason"] == "too_many_connections_per_ip" and refused[-1]["ip_address"] == "127.0.0.1"
    assert connect(gate, "127.0.0.2") is not None
    assert dict(gate.per_ip.items()) == {"127.0.0.1": 2, "127.0.0.2": 1}


def test_lists_and_auto_blocks_refuse_at_accept(refused: list[dict[str, Any]]) -> None:
    network = NetworkConfig(whitelist=IPListConfig(True, nets("127.0.0.0/8", "::1/128")),
                            blacklist=IPListConfig(True, nets("127.0.0.66/32")))
    gate, holder, clock = make_gate(network)
    assert connect(gate, "127.0.0.66") is None
    assert connect(gate, "192.0.2.1") is None
    assert connect(gate, "::1") is not None
    holder.blocklist.block("127.0.0.5", until=clock.seconds() + 60)
    assert connect(gate, "127.0.0.5") is None
    assert [e["reason"] for e in refused] == ["ip_blacklisted", "not_whitelisted", "ip_auto_blocked"]
    clock.advance(61)
    assert connect(gate, "127.0.0.5") is not None
    assert gate.total == 2 and gate.refused["ip_blacklisted"] == 1


def test_reloaded_lists_apply_to_the_next_connection() -> None:
    gate, holder, _ = make_gate(NetworkConfig())
    assert connect(gate, "127.0.0.7") is not None
    holder.set(NetworkConfig(blacklist=IPListConfig(True, nets("127.0.0.7/32"))))
    assert connect(gate, "127.0.0.7") is None


def test_proxy_protocol_checks_the_named_client(refused: list[dict[str, Any]]) -> None:
    network = NetworkConfig(proxy_protocol=True, trusted_proxies=nets("127.0.0.0/8"),
                            blacklist=IPListConfig(True, nets("203.0.113.0/24")))
    gate, _, _ = make_gate(network)
    assert connect(gate, "192.0.2.10") is None  # not a trusted load balancer
    assert refused[-1]["reason"] == "untrusted_proxy"

    ok = connect(gate, "127.0.0.1")
    ok.dataReceived(b"PROXY TCP4 198.51.100.4 127.0.0.1 5555 443\r\nGET /v1/x HTTP/1.1\r\nHost: a\r\n\r\n")
    assert ok.transport.value().endswith(b"198.51.100.4")

    bad = connect(gate, "127.0.0.1")
    bad.dataReceived(b"PROXY TCP4 203.0.113.9 127.0.0.1 5555 443\r\nGET /v1/x HTTP/1.1\r\nHost: a\r\n\r\n")
    assert bad.transport.value() == b""
    assert refused[-1]["reason"] == "ip_blacklisted" and refused[-1]["ip_address"] == "203.0.113.9"

    plain = connect(gate, "127.0.0.1")
    plain.dataReceived(b"GET /v1/x HTTP/1.1\r\nHost: a\r\n\r\n")  # no PROXY header: dropped
    assert plain.transport.value() == b"" and plain.transport.disconnecting


def test_proxied_clients_are_counted_per_named_client_and_forgotten_when_gone() -> None:
    network = NetworkConfig(proxy_protocol=True, ddos=DDoSConfig(max_connections=10, max_connections_per_ip=1))
    gate, _, _ = make_gate(network)
    head = b"PROXY TCP4 198.51.100.4 127.0.0.1 5555 443\r\nGET /v1/x HTTP/1.1\r\nHost: a\r\n\r\n"
    first = connect(gate, "127.0.0.1")
    first.dataReceived(head)
    assert dict(gate.per_ip.items()) == {"198.51.100.4": 1}  # the client named, not the balancer
    second = connect(gate, "127.0.0.1")
    second.dataReceived(head)
    assert second.transport.disconnecting and gate.refused["too_many_connections_per_ip"] == 1
    second.connectionLost(Failure(Exception("refused")))
    first.connectionLost(Failure(Exception("gone")))
    assert len(gate.per_ip) == 0 and gate.per_ip["198.51.100.4"] == 0 and gate.total == 0


# -- security headers


def decorate(config: SecurityHeadersConfig, upstream: dict[bytes, bytes], secure: bool) -> Headers:
    layer = NetworkLayer(NetworkConfig(security_headers=config))
    request = FakeRequest(secure=secure)
    headers = Headers({k: [v] for k, v in upstream.items()})
    layer.decorate(None, request, headers)
    return headers


def test_security_headers_added_without_clobbering_upstream() -> None:
    out = decorate(SecurityHeadersConfig(), {b"x-frame-options": b"SAMEORIGIN"}, secure=True)
    assert out.getRawHeaders(b"x-frame-options") == [b"SAMEORIGIN"]
    assert out.getRawHeaders(b"x-content-type-options") == [b"nosniff"]
    assert out.getRawHeaders(b"strict-transport-security") == [b"max-age=31536000; includeSubDomains"]


def test_security_headers_override_and_hsts_only_over_tls() -> None:
    config = SecurityHeadersConfig(override_upstream=True)
    out = decorate(config, {b"x-frame-options": b"SAMEORIGIN"}, secure=False)
    assert out.getRawHeaders(b"x-frame-options") == [b"DENY"]
    assert not out.hasHeader(b"strict-transport-security")


def test_a_refusal_by_the_server_side_carries_the_same_security_headers_as_an_answer() -> None:
    custom = SecurityHeadersConfig(headers=(("X-Custom", "yes"), ("Strict-Transport-Security", "max-age=60")))
    c = Conn(NetworkConfig(security_headers=custom)).send(b"NOT HTTP AT ALL\r\n\r\n")
    assert c.status() == 400
    head = c.output.split(b"\r\n\r\n")[0].split(b"\r\n")[1:]
    refused = {n.lower(): v for n, v in (line.split(b": ", 1) for line in head)}
    answered = dict(decorate(custom, {}, secure=False).getAllRawHeaders())
    assert answered == {b"X-Custom": [b"yes"]}  # plain HTTP: no Strict-Transport-Security
    assert {n.lower(): v[0] for n, v in answered.items()}.items() <= refused.items()
    assert b"strict-transport-security" not in refused


def test_security_headers_disabled() -> None:
    out = decorate(SecurityHeadersConfig(enabled=False, headers=()), {}, secure=True)
    assert list(out.getAllRawHeaders()) == []


# -- config


def plain(data: dict[str, Any]) -> dict[str, Any]:
    """`data` with TLS off, so only the keys under test matter."""
    server = {"tls": {"enabled": False}, **data.get("server", {})}
    return {**data, "server": server}


def net(data: dict[str, Any]) -> NetworkConfig:
    return parse(plain(data)).network


def test_defaults_are_the_seed_values() -> None:
    d = net({}).ddos
    assert (d.max_connections, d.max_connections_per_ip, d.max_request_size, d.max_header_size) == (
        10000, 100, 10485760, 8192)
    assert (d.read_timeout, d.header_timeout, d.tls_handshake_timeout, d.idle_timeout) == (30.0, 10.0, 10.0, 75.0)
    assert d.send_timeout == 60.0
    assert net({}).security_headers.headers[0] == ("X-Content-Type-Options", "nosniff")


def test_seed_snippets_parse() -> None:
    n = net({
        "server": {"security_headers": {"enabled": True, "headers": {"X-Frame-Options": "DENY"}},
                   "trusted_proxies": ["10.0.0.0/8"], "proxy_protocol": True},
        "security": {
            "ddos_protection": {"enabled": True, "max_connections": 10000, "max_connections_per_ip": 100,
                                "max_request_size": 10485760, "max_header_size": 8192,
                                "read_timeout": "30s", "header_timeout": "10s",
                                "tls_handshake_timeout": "5s", "idle_timeout": "2m", "send_timeout": "90s"},
            "ip_whitelist": {"enabled": True, "ips": ["10.0.0.0/8", "172.16.0.0/12", "192.168.1.0/24"]},
            "ip_blacklist": {"enabled": True, "ips": ["1.2.3.4"]},
        },
    })
    assert n.ddos.idle_timeout == 120.0 and n.ddos.tls_handshake_timeout == 5.0 and n.ddos.send_timeout == 90.0
    assert len(n.whitelist.ips) == 3 and n.blacklist.ips == nets("1.2.3.4/32")
    assert n.security_headers.headers == (("X-Frame-Options", "DENY"),)
    assert n.proxy_protocol and n.trusted_proxies == nets("10.0.0.0/8")


def test_disabled_protection_keeps_ceilings() -> None:
    d = net({"security": {"ddos_protection": {"enabled": False, "send_timeout": "30s"}}}).ddos
    assert d.max_connections is None and d.header_timeout is None
    assert d.send_timeout == 30.0  # it only reclaims connections nobody reads from: it stays
    assert d.max_request_size == 32 * 1024 * 1024


def test_list_without_enabled_applies() -> None:
    assert net({"security": {"ip_blacklist": {"ips": ["1.2.3.4"]}}}).blacklist.enabled


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"security": {"ddos_protection": {"max_connections": 10, "max_connections_per_ip": 11}}},
         "security.ddos_protection.max_connections_per_ip"),
        ({"security": {"ddos_protection": {"max_header_size": 10}}}, "security.ddos_protection.max_header_size"),
        ({"security": {"ddos_protection": {"header_timeout": "soon"}}}, "security.ddos_protection.header_timeout"),
        ({"security": {"ddos_protection": {"max_conections": 1}}}, "security.ddos_protection.max_conections"),
        ({"security": {"ip_whitelist": {"enabled": True, "ips": []}}}, "security.ip_whitelist.ips"),
        ({"security": {"ip_blacklist": {"ips": ["10.0.0.1/8"]}}}, "security.ip_blacklist.ips[0]"),
        ({"server": {"trusted_proxies": ["nope"]}}, "server.trusted_proxies[0]"),
        ({"server": {"proxy_protocol": "yes"}}, "server.proxy_protocol"),
    ],
)
def test_config_faults_name_their_path(data: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse(plain(data))
    assert e.value.path == path


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Evil": "a\r\nSet-Cookie: x=1"},  # header injection through the config
        {"X-Evil": "a\nb"},
        {"X-Evil": "a\x00b"},
        {"X Evil": "1"},
        {"Bad:Name": "1"},
        {"Content-Length": "0"},
        {"Transfer-Encoding": "chunked"},
        {"X-A": "1", "x-a": "2"},
        {"X-A": ""},
    ],
)
def test_security_header_injection_refused(headers: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as e:
        parse(plain({"server": {"security_headers": {"headers": headers}}}))
    assert e.value.path.startswith("server.security_headers.headers")


def test_client_header_injection_refused() -> None:
    c = Conn().send(b"GET /v1/models HTTP/1.1\r\nHost: a\r\nX-Inject: a\r\r\nSet-Cookie: b\r\n\r\n")
    assert c.output.startswith(b"HTTP/1.1 400") and c.resource.seen == []


# -- the client named by X-Forwarded-For meets the lists per request


def _check(layer: NetworkLayer, peer: str, client: str) -> Any:
    from types import SimpleNamespace

    from twisted.internet import defer

    ctx = SimpleNamespace(peer_ip=peer, client_ip=client, request_id="req_x")
    failures: list[Failure] = []
    defer.ensureDeferred(layer.check(ctx)).addErrback(failures.append)  # type: ignore[arg-type]
    return failures[0].value if failures else None


def test_forwarded_client_meets_lists_and_auto_blocks(refused: list[dict[str, Any]]) -> None:
    from ccproxy.errors import ApiError

    clock = Clock()
    deps = attrs.make_class("Deps", ["reactor", "blocklist"])(clock, BlockList())
    network = NetworkConfig(blacklist=IPListConfig(True, nets("198.51.100.0/24")),
                            trusted_proxies=nets("127.0.0.0/8"))
    layer = NetworkLayer(network, deps)
    assert _check(layer, "127.0.0.1", "127.0.0.1") is None  # judged at accept already
    assert _check(layer, "127.0.0.1", "203.0.113.1") is None
    error = _check(layer, "127.0.0.1", "198.51.100.7")
    assert isinstance(error, ApiError) and error.status == 403
    deps.blocklist.block("203.0.113.1", until=60)
    assert _check(layer, "127.0.0.1", "203.0.113.1").status == 403
    assert [(e["reason"], e["ip_address"]) for e in refused] == [
        ("ip_blacklisted", "198.51.100.7"), ("ip_auto_blocked", "203.0.113.1")]
