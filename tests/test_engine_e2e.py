"""The HTTP engine under abuse, against the real daemon over real TLS sockets."""

from __future__ import annotations

import json
import socket
import ssl
from typing import Any

import pytest

from tests.support.authkit import UPSTREAM_KEYS
from tests.support.upstream import FakeUpstream

KEY = "ccp_e2e-engine-key-000000000000000000a1"
MESSAGE = json.dumps({"model": "claude-sonnet-4-6", "max_tokens": 10,
                      "messages": [{"role": "user", "content": "hi"}]}).encode()


def with_keys() -> dict[str, Any]:
    return {"upstreams": {name: {"api_key": key} for name, key in UPSTREAM_KEYS.items()},
            "security": {"auth": {"enabled": True, "api_keys": []},
                         "api_keys": {"keys": [{"id": "k1", "key": KEY}]}}}


def connect(d: Any) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", d.port), timeout=10)
    return d.ssl_context().wrap_socket(raw, server_hostname="localhost")


def read_response(s: ssl.SSLSocket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = s.recv(65536)
        assert chunk
        body += chunk
    return int(status.split()[1]), headers, body


def closed(s: ssl.SSLSocket) -> bool:
    try:
        return s.recv(1) == b""
    except (ConnectionResetError, ssl.SSLError):
        return True


@pytest.mark.parametrize("expect", [False, True], ids=["plain", "expect-100-continue"])
def test_an_unauthenticated_10mb_declaration_gets_its_401_without_sending_the_body(
        daemon, upstream: FakeUpstream, expect: bool) -> None:
    d = daemon(with_keys())
    s = connect(d)
    s.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
              + (b"Expect: 100-continue\r\n" if expect else b"") + b"Content-Length: 10000000\r\n\r\n")
    # Not a byte of the body is sent: the answer must come from the head alone.
    status, headers, body = read_response(s)
    assert status == 401, body
    assert json.loads(body)["error"]["type"] == "authentication_error"
    assert headers["connection"] == "close" and closed(s)
    assert upstream.requests == []


def test_an_authenticated_client_is_invited_to_send_its_body_and_is_served(daemon, upstream: FakeUpstream) -> None:
    d = daemon(with_keys())
    s = connect(d)
    s.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nx-api-key: "
              + KEY.encode() + b"\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(MESSAGE))
    assert s.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
    s.sendall(MESSAGE)
    status, _, body = read_response(s)
    assert status == 200, body
    assert [json.loads(r.body) for r in upstream.requests] == [json.loads(MESSAGE)]


def test_a_small_refused_body_is_dropped_and_the_connection_serves_the_next_request(daemon) -> None:
    d = daemon(with_keys())
    s = connect(d)
    s.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n" % len(MESSAGE) + MESSAGE)
    assert read_response(s)[0] == 401
    s.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert read_response(s)[0] == 200


@pytest.mark.parametrize("method", ["TRACE", "CONNECT"])
def test_refused_methods_are_refused_on_health_and_ready_too(daemon, method: str) -> None:
    d = daemon()
    for path in ("/health", "/ready"):
        s = connect(d)
        s.sendall(f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        status, _, body = read_response(s)
        assert status == 405, (path, body)
        assert json.loads(body)["error"]["type"] == "invalid_request_error"
