"""The upstream connection's lifecycle through the real daemon: which connections are reused, and
what happens to bytes an upstream sends when nothing was asked."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.raw_upstream import RawUpstream, Reply
from tests.test_e2e_forwarding import raw_request

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


@pytest.fixture
def raw_daemon(daemon: Any) -> Iterator[Any]:
    started: list[RawUpstream] = []

    def start(replies: list[Reply]) -> tuple[Any, RawUpstream]:
        upstream = RawUpstream(replies)
        started.append(upstream)
        ups = {"base_url": upstream.url}
        return daemon({"upstreams": {"anthropic": dict(ups), "openai": dict(ups)}}), upstream

    yield start
    for upstream in started:
        upstream.close()


def get(d: Any) -> tuple[int, bytes]:
    status, _, body = raw_request(d, "GET", "/v1/models")
    return status, body


def test_a_healthy_connection_is_reused(raw_daemon: Any) -> None:
    d, upstream = raw_daemon([Reply(OK), Reply(OK), Reply(OK)])
    assert [get(d) for _ in range(3)] == [(200, b"{}")] * 3
    assert upstream.connections == 1


def test_bytes_on_an_idle_connection_are_never_served(raw_daemon: Any) -> None:
    injected = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\r\n{\"evil\":true}"
    d, upstream = raw_daemon([Reply(OK, later=injected, delay=0.2), Reply(OK)])
    assert get(d) == (200, b"{}")
    time.sleep(1.0)  # the unasked bytes arrive while the connection is idle in the pool
    assert get(d) == (200, b"{}")
    assert upstream.connections == 2


@pytest.mark.parametrize("first", [
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n"
    b"2\r\n{}\r\n0\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
], ids=["te-and-cl", "http-1.0", "after-1xx"])
def test_a_connection_is_not_reused_after_a_doubtful_response(raw_daemon: Any, first: bytes) -> None:
    d, upstream = raw_daemon([Reply(first), Reply(OK)])
    assert get(d) == (200, b"{}")
    assert get(d) == (200, b"{}")
    assert upstream.connections == 2


def test_an_upstream_that_answers_101_gets_a_502(raw_daemon: Any) -> None:
    d, upstream = raw_daemon([Reply(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n")])
    status, body = get(d)
    assert status == 502 and "invalid response" in json.loads(body)["error"]["message"]
    assert get(d) == (200, b"{}")
    assert upstream.connections == 2
