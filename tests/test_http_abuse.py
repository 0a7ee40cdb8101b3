"""The server side under abuse: work per received byte, memory per body byte, in memory."""

from __future__ import annotations

import gc
import itertools
import tracemalloc

import pytest

from ccproxy.config.network import CEILING_HEADER_SIZE
from ccproxy.http.http1 import ChunkedDecoder, HeadScan, Malformed
from tests.support.hardening import Conn, config


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
