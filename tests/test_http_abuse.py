"""The server side under abuse: work per received byte, memory per body byte, in memory."""

from __future__ import annotations

import gc
import itertools
import json
import tracemalloc
import weakref
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv6Address
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET

from ccproxy import service
from ccproxy.blocklist import BlockList
from ccproxy.config import ConfigError, parse
from ccproxy.config.network import CEILING_HEADER_SIZE
from ccproxy.context import Layer
from ccproxy.deadline import Deadline, TimedOut, within
from ccproxy.forward import Forwarder
from ccproxy.http.http1 import ChunkedDecoder, HeadScan, Malformed
from ccproxy.network.addresses import client_key
from ccproxy.network.gate import Gate
from ccproxy.resource import ProxyResource
from ccproxy.runtime import Deps, Runtime, RuntimeHolder, build
from ccproxy.service import release_heap
from ccproxy.site import ProxySite
from tests.support.authkit import UPSTREAM_KEYS
from tests.support.hardening import Conn, Recorder, config


def max_head(size: int) -> bytes:
    """A valid request head of exactly `size` bytes (the blank line not counted), then the blank line."""
    start = b"GET /v1/models HTTP/1.1\r\nHost: proxy\r\n"
    filler = size - len(start) - len(b"X-Pad: \r\n")
    return start + b"X-Pad: " + b"a" * filler + b"\r\n\r\n"


def trickled_head_work(size: int) -> int:
    c = Conn(config(max_header_size=size))
    head = max_head(size)
    for i in range(len(head)):
        c.send(head[i : i + 1])
    assert c.status() == 200, c.output[:200]
    examined: int = c.channel.scan.examined
    return examined


def test_a_maximum_size_head_trickled_a_byte_per_read_costs_linear_work() -> None:
    sizes = [CEILING_HEADER_SIZE // 8, CEILING_HEADER_SIZE // 4, CEILING_HEADER_SIZE // 2, CEILING_HEADER_SIZE]
    work = [trickled_head_work(size) for size in sizes]
    # Each byte is looked at a few times (the 3-byte overlap, the bare CR/LF search), never once per read.
    for size, examined in zip(sizes, work, strict=True):
        assert examined <= 8 * size, (size, examined)
    # Doubling the head doubles the work (a rescan per read would quadruple it).
    for small, large in itertools.pairwise(work):
        assert large <= 2.2 * small


def test_head_scan_finds_an_end_split_across_reads_at_every_point() -> None:
    head = max_head(300)
    for cut in range(1, len(head)):
        scan = HeadScan(8192)
        buffer = bytearray(head[:cut])
        first = scan.find(buffer)
        buffer += head[cut:]
        assert (first if first >= 0 else scan.find(buffer)) == len(head) - 4


def test_head_scan_sees_a_bare_cr_completed_by_a_later_read() -> None:
    scan = HeadScan(8192)
    buffer = bytearray(b"GET / HTTP/1.1\r")
    assert scan.find(buffer) == -1  # the LF may still come
    buffer += b"Host: a"
    with pytest.raises(Malformed):
        scan.find(buffer)


def test_pipelined_heads_in_one_read_are_each_scanned_once() -> None:
    one = b"GET /v1/models HTTP/1.1\r\nHost: proxy\r\n\r\n"
    c = Conn()
    c.send(one * 1000)
    assert len(c.resource.seen) == 1000
    assert c.channel.scan.examined <= 2 * len(one) * 1000


def test_chunked_body_and_trailers_trickled_a_byte_per_read_cost_linear_work() -> None:
    wire = (b"2;ext=1\r\nab\r\n" * 2000) + b"0\r\n" + b"X-Trailer: " + b"t" * 8000 + b"\r\n\r\nNEXT"
    decoder = ChunkedDecoder(1 << 20)
    body = bytearray()
    used = 0
    for i in range(len(wire)):
        used += decoder.feed_into(wire[i : i + 1], body)
        if decoder.done:
            break
    assert decoder.done and bytes(body) == b"ab" * 2000
    assert wire[used:] == b"NEXT"
    assert decoder.examined <= 2 * len(wire)


def test_chunked_body_in_one_read_of_tiny_chunks_is_read_without_copying_the_rest() -> None:
    wire = b"1\r\na\r\n" * 50_000 + b"0\r\n\r\n"
    decoder = ChunkedDecoder(1 << 20)
    body = bytearray()
    assert decoder.feed_into(wire, body) == len(wire)
    assert body == b"a" * 50_000
    assert decoder.examined <= len(wire)


def peak_while_reading(wire: list[bytes], body_size: int) -> float:
    """The traced peak while the channel reads `wire`, over the body's size."""
    c = Conn()
    c.send(wire[0])
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        for piece in wire[1:]:
            c.send(piece)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert c.resource.seen and len(c.resource.seen[0][2]) == body_size
    return peak / body_size


BODY = 1 << 18


def test_a_body_of_two_byte_chunks_costs_a_small_constant_times_its_size() -> None:
    head = b"POST /v1/messages HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunks = b"2\r\nab\r\n" * (BODY // 2) + b"0\r\n\r\n"
    # Reads of the size TLS hands over; each read is made before tracing starts.
    wire = [head] + [chunks[i : i + 16384] for i in range(0, len(chunks), 16384)]
    ratio = peak_while_reading(wire, BODY)
    # One buffer growing (~1.1 x) and the bytes handed on (1 x); an object per chunk would be ~20 x.
    assert ratio < 3, ratio


def test_a_declared_length_body_in_small_reads_costs_a_small_constant_times_its_size() -> None:
    head = b"POST /v1/messages HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % BODY
    wire = [head] + [b"abcdefghij"] * (BODY // 10) + [b"x" * (BODY % 10)]
    ratio = peak_while_reading(wire, BODY)
    assert ratio < 3, ratio


# -- decisions from the head

KEY = "ccp_abuse-test-key-000000000000000000a1"


def proxy(security: dict[str, Any] | None = None, **ddos: Any) -> Conn:
    """A connection to the real resource and layers (auth by API key), with no upstream behind."""
    sec: dict[str, Any] = {"auth": {"enabled": True, "api_keys": []},
                           "api_keys": {"keys": [{"id": "k1", "key": KEY}]},
                           "ddos_protection": ddos, **(security or {})}
    cfg = parse({"server": {"tls": {"enabled": False}},
                 "upstreams": {name: {"api_key": key} for name, key in UPSTREAM_KEYS.items()},
                 "security": sec}, environ={})
    clock = Clock()
    holder = RuntimeHolder(build(cfg, Deps(clock, BlockList()), Forwarder(clock)))
    return Conn(cfg.network, resource=ProxyResource(holder, clock))


def large_post(length: int = 10_000_000, *extra: bytes) -> bytes:
    return b"".join([b"POST /v1/messages HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n",
                     *extra, b"Content-Length: %d\r\n\r\n" % length])


@pytest.mark.parametrize("expect", [False, True])
def test_an_unauthenticated_large_body_is_refused_from_the_head(expect: bool) -> None:
    c = proxy()
    c.send(large_post(10_000_000, *([b"Expect: 100-continue\r\n"] if expect else [])))
    assert c.status() == 401, c.output[:300]
    assert b"100 Continue" not in c.output
    _, headers, body = split(c.output)
    assert headers[b"connection"] == b"close" and c.closed  # the body it may still send is not read
    assert json.loads(body)["error"]["type"] == "authentication_error"
    assert c.site.budget.used == 0


def test_a_small_body_refused_from_the_head_is_dropped_and_the_connection_kept() -> None:
    c = proxy()
    c.send(large_post(2) + b"{}" + b"GET /v1/models HTTP/1.1\r\nHost: a\r\n\r\n")
    assert c.output.count(b"HTTP/1.1 401") == 2 and not c.closed
    assert b"connection: close" not in c.output.lower()


def test_a_refused_body_still_coming_is_dropped_as_it_arrives() -> None:
    c = proxy()
    c.send(large_post(1000))
    assert c.status() == 401 and not c.closed
    assert c.channel.phase == "discard"
    c.send(b"x" * 999)
    assert c.channel.phase == "discard" and not c.channel.pending
    c.send(b"x" + b"GET /v1/models HTTP/1.1\r\nHost: a\r\n\r\n")
    assert c.output.count(b"HTTP/1.1 401") == 2 and c.channel.phase == "head"


def test_an_accepted_request_gets_100_continue_then_its_body_is_checked() -> None:
    c = proxy({"request_validation": {"enabled": True}})
    c.send(large_post(9, b"x-api-key: " + KEY.encode() + b"\r\n", b"Expect: 100-continue\r\n"))
    assert c.output == b"HTTP/1.1 100 Continue\r\n\r\n"
    c.send(b"not json!")
    assert c.output.count(b"HTTP/1.1 400") == 1  # the body check ran on the body read after the head passed


class Deciding:
    """A resource that takes its time over the head: the body is asked for only when told."""

    def __init__(self) -> None:
        self.requests: list[Any] = []
        self.bodies: list[bytes] = []

    def render(self, request: Any) -> Any:
        self.requests.append(request)
        return NOT_DONE_YET

    def go_on(self) -> None:
        request = self.requests[-1]
        request.read_body().addCallback(lambda body: (self.bodies.append(body), request.respond(b"ok")))


def test_nothing_is_read_while_the_head_is_being_decided() -> None:
    resource = Deciding()
    c = Conn(resource=resource)
    c.send(b"POST /v1/messages HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
    assert c.output == b"" and c.transport.producerState == "paused"
    resource.go_on()
    assert c.output == b"HTTP/1.1 100 Continue\r\n\r\n" and c.transport.producerState == "producing"
    c.send(b"hello")
    assert resource.bodies == [b"hello"] and c.status() == 100


# -- the process-wide buffer budget


def split(output: bytes) -> tuple[bytes, dict[bytes, bytes], bytes]:
    head, _, body = output.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    return status, {k.strip().lower(): v.strip() for k, v in (line.split(b":", 1) for line in lines)}, body


MiB = 1024 * 1024


def test_a_body_that_would_pass_the_budget_is_refused_503_before_it_is_read(
        seen_events: list[dict[str, Any]]) -> None:
    holding = Conn(config(max_buffered_bytes=MiB), resource=Recorder(hold=True))
    holding.send(large_post(800_000) + b"a" * 800_000)
    assert holding.site.budget.used == 800_000  # held while its request is answered
    c = proxy(max_buffered_bytes="1MiB")
    c.site.budget = holding.site.budget
    c.send(large_post(300_000, b"x-api-key: " + KEY.encode() + b"\r\n"))
    status, headers, body = split(c.output)
    assert status.startswith(b"HTTP/1.1 503") and headers[b"retry-after"] == b"1" and c.closed
    assert json.loads(body)["error"]["type"] == "overloaded_error"
    assert any(e["ccproxy_event"] == "server_overloaded" for e in seen_events)
    assert holding.site.budget.used == 800_000
    holding.resource.open[0].respond(b"done")
    assert holding.site.budget.used == 0
    again = Conn(config(max_buffered_bytes=MiB))
    again.site.budget = holding.site.budget
    again.send(large_post(300_000) + b"b" * 300_000)
    assert again.status() == 200 and again.site.budget.used == 0


def test_a_chunked_body_is_counted_as_its_chunks_are_declared() -> None:
    c = Conn(config(max_buffered_bytes=MiB), resource=Recorder(hold=True))
    c.send(b"POST /v1/messages HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    c.send(b"80000\r\n" + b"a" * 0x80000 + b"\r\n")
    assert c.site.budget.used == 0x80000 and c.output == b""
    c.send(b"80001\r\n")
    assert c.status() == 503 and c.closed and c.site.budget.used == 0


# -- IPv6 clients are keyed by their network


def test_client_key_groups_ipv6_by_prefix_and_leaves_ipv4_alone() -> None:
    assert client_key("192.0.2.7") == "192.0.2.7"
    assert client_key("2001:db8::1") == client_key("2001:db8::ffff:1") == "2001:db8::/64"
    assert client_key("2001:db8:0:1::1") == "2001:db8:0:1::/64"
    assert client_key("2001:db8::1", 48) == "2001:db8::/48"
    assert client_key("2001:db8::1", 128) == "2001:db8::1"


def gate_for(security: dict[str, Any]) -> Gate:
    cfg = parse({"server": {"tls": {"enabled": False}}, "security": security}, environ={})
    clock = Clock()
    holder = RuntimeHolder(build(cfg, Deps(clock, BlockList()), Forwarder(clock)))
    site = ProxySite(ProxyResource(holder, clock), clock)
    site.network = lambda: cfg.network
    return Gate(site, holder, clock)


def connect(gate: Gate, host: str) -> Any:
    addr = IPv6Address("TCP", host, 5000)
    proto = gate.buildProtocol(addr)
    if proto is not None:
        proto.makeConnection(StringTransport(peerAddress=addr))
    return proto


@pytest.mark.parametrize("prefix", [64, 128])
def test_the_per_ip_cap_counts_an_ipv6_network_together(prefix: int) -> None:
    gate = gate_for({"ddos_protection": {"max_connections_per_ip": 2, "ipv6_prefix": prefix}})
    assert connect(gate, "2001:db8::1") and connect(gate, "2001:db8::2")
    third = connect(gate, "2001:db8::ffff")
    assert (third is None) == (prefix == 64)
    assert connect(gate, "2001:db8:0:1::1") is not None  # the next /64 is someone else


def test_an_auto_block_covers_the_clients_whole_ipv6_network(seen_events: list[dict[str, Any]]) -> None:
    gate = gate_for({"ip_blacklist": {"enabled": False,
                                      "auto_block": {"enabled": True, "threshold": 3, "duration": "10m"}}})
    proto = connect(gate, "2001:db8::1")
    for _ in range(4):
        proto.dataReceived(b"GET /nowhere HTTP/1.1\r\nHost: a\r\n\r\n")
    [blocked] = [e for e in seen_events if e["ccproxy_event"] == "ip_auto_blocked"]
    assert blocked["ip_address"] == "2001:db8::/64"
    assert connect(gate, "2001:db8::77") is None  # another address of the same /64, refused at accept
    assert connect(gate, "2001:db8:0:1::1") is not None


def test_ipv6_prefix_is_checked_with_its_path() -> None:
    with pytest.raises(ConfigError) as e:
        parse({"server": {"tls": {"enabled": False}}, "security": {"ddos_protection": {"ipv6_prefix": 129}}})
    assert "security.ddos_protection.ipv6_prefix" in str(e.value)


# -- memory handed back after a burst of connections


class Cycle:
    def __init__(self) -> None:
        self.me = self


def test_release_heap_collects_cycles_left_by_closed_connections() -> None:
    gc.collect()
    before = gc.get_threshold()
    gc.set_threshold(10_000, 10, 10)  # what settle_heap sets: a lone cycle is not collected by itself
    try:
        cycle = Cycle()
        gone = weakref.ref(cycle)
        del cycle
        assert gone() is not None
        release_heap()
        assert gone() is None
    finally:
        gc.set_threshold(*before)


def test_memory_is_released_once_enough_connections_have_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    released: list[int] = []
    monkeypatch.setattr(service, "release_heap", lambda: released.append(1))
    clock = Clock()
    svc = service.ProxyService("unused.yaml", parse({"server": {"tls": {"enabled": False}}}), clock)
    svc.gate = Gate.__new__(Gate)
    svc.gate.closed_count = 0
    svc.release.start(service.RELEASE_EVERY, now=False)
    svc.gate.closed_count = service.RELEASE_AFTER - 1
    clock.advance(service.RELEASE_EVERY)
    assert released == []
    svc.gate.closed_count += 1
    clock.advance(service.RELEASE_EVERY)
    assert released == [1]
    clock.advance(service.RELEASE_EVERY)
    assert released == [1]  # nothing more has closed since
    svc.release.stop()


# -- one deadline helper


def test_deadline_arms_pushes_back_cancels_and_fires_once() -> None:
    clock = Clock()
    fired: list[float] = []
    deadline = Deadline(clock, lambda: fired.append(clock.seconds()))
    deadline.arm(5)
    clock.advance(3)
    deadline.arm(5)  # pushed back: now due at 8
    clock.advance(4)
    assert fired == [] and deadline.armed
    clock.advance(1)
    assert fired == [8] and not deadline.armed
    deadline.arm(2)
    deadline.cancel()
    deadline.arm(None)  # no deadline at all
    clock.advance(10)
    assert fired == [8] and clock.getDelayedCalls() == []


def test_within_cancels_late_work_and_says_it_was_the_time_whatever_the_cancel_raised() -> None:
    clock = Clock()

    def cancelled_as_lost(d: defer.Deferred[int]) -> None:
        d.errback(ConnectionLost("cancelled"))  # what a cancelled upstream request may fail with

    late: defer.Deferred[int] = defer.Deferred(cancelled_as_lost)
    outcome = defer.ensureDeferred(within(clock, 5, late))
    clock.advance(4.9)
    assert not outcome.called
    clock.advance(0.1)
    failure = failure_of(outcome)
    assert failure.check(TimedOut) and failure.value.seconds == 5

    prompt: defer.Deferred[int] = defer.Deferred()
    answered = defer.ensureDeferred(within(clock, 5, prompt))
    prompt.callback(7)
    assert answered.result == 7 and clock.getDelayedCalls() == []

    broken: defer.Deferred[int] = defer.Deferred()
    refused = defer.ensureDeferred(within(clock, 5, broken))
    broken.errback(ConnectionRefusedError())
    assert failure_of(refused).check(ConnectionRefusedError) and clock.getDelayedCalls() == []


def failure_of(d: defer.Deferred[Any]) -> Failure:
    caught: list[Failure] = []
    d.addErrback(caught.append)
    assert len(caught) == 1, "the work should have failed by now"
    return caught[0]


def test_the_date_header_comes_from_the_injected_clock() -> None:
    c = Conn()
    c.clock.rightNow = 1_750_000_000.0  # set, not advanced: advancing would fire the idle deadline
    c.send(b"GET /v1/models HTTP/1.1\r\nHost: a\r\n\r\n")
    assert split(c.output)[1][b"date"] == b"Sun, 15 Jun 2025 15:06:40 GMT"


class Recording(Layer):
    def __init__(self) -> None:
        self.done: list[tuple[bytes, int, bool]] = []

    def completed(self, ctx: Any, request: Any, status: int) -> None:
        self.done.append((request.path, status, ctx is not None))


def test_layers_hear_of_every_completed_request_with_its_status() -> None:
    cfg = parse({"server": {"tls": {"enabled": False}}}, environ={})
    clock = Clock()
    recording = Recording()
    runtime = Runtime(config=cfg, named={"recording": recording}, forwarder=Forwarder(clock), deps=Deps(clock, BlockList()))
    c = Conn(cfg.network, resource=ProxyResource(RuntimeHolder(runtime), clock))
    c.send(b"GET /health HTTP/1.1\r\nHost: a\r\n\r\nGET /nowhere HTTP/1.1\r\nHost: a\r\n\r\n"
           b"TRACE /v1/messages HTTP/1.1\r\nHost: a\r\n\r\n")
    assert recording.done == [(b"/health", 200, False), (b"/nowhere", 404, False), (b"/v1/messages", 405, False)]
