"""Faithful forwarding through the real daemon: SDKs, streaming, errors, headers, timeouts."""

from __future__ import annotations

import contextlib
import gzip
import json
import re
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest

from tests.support.clients import anthropic_client, openai_client
from tests.support.upstream import FakeUpstream, Script, anthropic_stream, message_json, openai_stream
from tests.support.waiting import wait_steady, wait_until

SSE = {"content-type": "text/event-stream", "request-id": "req_upstream_stream"}
UPSTREAM_KEY = "sk-ant-api03-upstreamupstreamupstream-f3a9"


def raw_request(d: Any, method: str, path: str, headers: dict[str, str] | None = None,
                body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request over TLS, read to the end: status, headers (lower-cased), body."""
    import http.client

    conn = http.client.HTTPSConnection(d.host, d.port, context=d.ssl_context(), timeout=20)
    try:
        conn.request(method, path, body=body or None, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


def test_anthropic_stream_event_by_event(daemon, upstream: FakeUpstream) -> None:
    d = daemon({"upstreams": {"anthropic": {"api_key": UPSTREAM_KEY}}})
    deltas = ["Hel", "lo, ", "wor", "ld"]
    # The SDK drops ping events, so leave them out to keep indexes aligned.
    events = [e for e in anthropic_stream(deltas) if not e.startswith(b"event: ping")]
    received = [threading.Event() for _ in events]
    late: list[int] = []

    def before(i: int) -> None:
        # Event i is produced only once the client has seen event i-1: proves no buffering.
        if i and not received[i - 1].wait(10):
            late.append(i)

    upstream.expect(Script(events=events, headers=SSE, before_event=before))
    client = anthropic_client(d)
    seen = []
    with client.messages.create(model="m", max_tokens=10, stream=True,
                                messages=[{"role": "user", "content": "hi"}]) as stream:
        for i, event in enumerate(stream):
            seen.append(event.type)
            received[i].set()
    assert late == []
    assert seen == ["message_start", "content_block_start", *["content_block_delta"] * 4,
                    "content_block_stop", "message_delta", "message_stop"]
    assert upstream.requests[-1].header("x-api-key") == UPSTREAM_KEY


def test_anthropic_stream_helper_final_text(daemon, upstream: FakeUpstream) -> None:
    d = daemon()
    upstream.expect(Script(events=anthropic_stream(["The ", "answer ", "is 42."]), headers=SSE))
    with anthropic_client(d).messages.stream(model="m", max_tokens=10,
                                             messages=[{"role": "user", "content": "q"}]) as stream:
        final = stream.get_final_message()
    assert final.content[0].text == "The answer is 42."


def test_openai_stream(daemon, upstream: FakeUpstream) -> None:
    d = daemon({"upstreams": {"openai": {"api_key": "sk-proj-upstreamupstream-0000"}}})
    upstream.expect(Script(events=openai_stream(["a", "b", "c"]), headers={"content-type": "text/event-stream"}))
    chunks = openai_client(d).chat.completions.create(
        model="gpt-4o", stream=True, messages=[{"role": "user", "content": "hi"}])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "abc"
    assert upstream.requests[-1].header("authorization") == "Bearer sk-proj-upstreamupstream-0000"


def test_upstream_errors_pass_through_unchanged(daemon, upstream: FakeUpstream) -> None:
    d = daemon()
    body = json.dumps({"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}).encode()
    upstream.expect(Script(status=429, body=body, headers={
        "content-type": "application/json", "retry-after": "7", "request-id": "req_up_429",
        "anthropic-ratelimit-requests-remaining": "0"}))
    status, headers, data = raw_request(d, "POST", "/v1/messages", {"content-type": "application/json"}, b"{}")
    assert (status, data) == (429, body)
    assert headers["retry-after"] == "7"
    assert headers["request-id"] == "req_up_429"
    assert headers["anthropic-ratelimit-requests-remaining"] == "0"

    overloaded = json.dumps({"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}).encode()
    upstream.expect(Script(status=529, body=overloaded, headers={"content-type": "application/json"}))
    with pytest.raises(anthropic.APIStatusError) as info:
        anthropic_client(d).messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 529
    assert info.value.body == json.loads(overloaded)


def test_error_inside_stream_passes_through(daemon, upstream: FakeUpstream) -> None:
    d = daemon()
    events = anthropic_stream(["partial"])[:3] + [
        b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n']
    upstream.expect(Script(events=events, headers=SSE))
    status, _, data = raw_request(d, "POST", "/v1/messages", {"content-type": "application/json"}, b"{}")
    assert status == 200
    assert data == b"".join(events)


def test_unreachable_upstream_is_502_in_api_shape(daemon, upstream: FakeUpstream) -> None:
    from tests.support.daemon import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    d = daemon({"upstreams": {"anthropic": {"base_url": dead}, "openai": {"base_url": dead}}})
    status, headers, data = raw_request(d, "POST", "/v1/messages", {}, b"{}")
    assert status == 502
    body = json.loads(data)
    assert body["type"] == "error" and body["error"]["type"] == "api_error"
    assert "unreachable" in body["error"]["message"]
    assert headers["request-id"].startswith("req_ccp_")
    status, _, data = raw_request(d, "POST", "/openai/v1/chat/completions", {}, b"{}")
    assert status == 502
    assert set(json.loads(data)["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.InternalServerError):
        openai_client(d).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert re.search(r"upstream_error .*upstream=anthropic status=502 reason=anthropic upstream unreachable", d.log())


def test_slow_upstream_is_504(daemon, upstream: FakeUpstream) -> None:
    d = daemon({"upstreams": {"anthropic": {"read_timeout": "1s"}}})
    upstream.expect(Script(delay=10, body=b"{}", headers={"content-type": "application/json"}))
    started = time.monotonic()
    status, _, data = raw_request(d, "POST", "/v1/messages", {}, b"{}")
    assert status == 504
    assert json.loads(data)["error"]["type"] == "timeout_error"
    # Not before the 1 s read timeout, and well before the upstream would have answered.
    assert 1.0 <= time.monotonic() - started < 10.0


def test_upstream_cut_mid_stream_gives_error_event_then_clean_close(daemon, upstream: FakeUpstream) -> None:
    d = daemon()
    events = anthropic_stream(["one", "two", "three"])
    upstream.expect(Script(events=events, headers=SSE, cut_after=4))
    status, _, data = raw_request(d, "POST", "/v1/messages", {}, b"{}")  # reads to a clean end
    assert status == 200
    assert data.startswith(b"".join(events[:4]))
    tail = data[len(b"".join(events[:4])):]
    assert tail.startswith(b"event: error\ndata: ")
    error = json.loads(tail.split(b"data: ", 1)[1])
    assert error["type"] == "error" and error["error"]["type"] == "api_error"
    assert "upstream_error" in d.log() and "mid-response" in d.log()


def test_client_disconnect_cancels_upstream(daemon, upstream: FakeUpstream) -> None:
    d = daemon()
    upstream.expect(Script(events=anthropic_stream(["x"] * 200), headers=SSE, event_gap=0.05))
    ctx = d.ssl_context()
    with socket.create_connection((d.host, d.port)) as raw, ctx.wrap_socket(raw, server_hostname="localhost") as s:
        s.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        assert b"200" in s.recv(4096)
        closed_at = time.monotonic()
    deadline = time.monotonic() + 5
    while not upstream.aborted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert upstream.aborted, "the upstream kept streaming to a client that was gone"
    # The upstream wrote events every 50 ms for 10 s: its first failed write shows it was cut off
    # promptly, long before its stream would have ended (a slow runner only delays the cut).
    assert upstream.aborted[0] - closed_at < 8


def test_headers_query_and_bodies_kept_faithfully(daemon, upstream: FakeUpstream) -> None:
    d = daemon({"upstreams": {"anthropic": {"api_key": UPSTREAM_KEY}}})
    gz = gzip.compress(json.dumps(message_json("zipped")).encode())
    upstream.expect(Script(body=gz, headers={
        "content-type": "application/json", "content-encoding": "gzip", "x-upstream-extra": "kept",
        "request-id": "req_up_1", "keep-alive": "timeout=5"}))
    status, headers, data = raw_request(d, "POST", "/v1/messages?beta=true", {
        "content-type": "application/json", "anthropic-version": "2023-06-01",
        "anthropic-beta": "a-2025-01-01,b-2025-02-02", "x-api-key": "client-secret-key",
        "accept-encoding": "gzip", "connection": "keep-alive, x-client-hop", "x-client-hop": "no",
        "te": "trailers", "x-custom": "yes"}, b'{"model":"m"}')
    seen = upstream.requests[-1]
    assert seen.path == "/v1/messages?beta=true"
    assert seen.body == b'{"model":"m"}'
    assert seen.header("anthropic-beta") == "a-2025-01-01,b-2025-02-02"
    assert seen.header("anthropic-version") == "2023-06-01"
    assert seen.header("x-custom") == "yes"
    assert seen.header("accept-encoding") == "gzip"
    assert seen.header("x-api-key") == UPSTREAM_KEY
    assert seen.header("x-client-hop") is None and seen.header("te") is None
    assert status == 200
    assert data == gz  # not decompressed, not re-encoded
    assert headers["content-encoding"] == "gzip"
    assert headers["x-upstream-extra"] == "kept"
    assert headers["request-id"] == "req_up_1"
    assert "keep-alive" not in headers


def test_redirects_not_followed(daemon, upstream: FakeUpstream) -> None:
    d = daemon()
    upstream.expect(Script(status=307, body=b"", headers={"location": "http://127.0.0.1:1/elsewhere"}))
    status, headers, _ = raw_request(d, "GET", "/v1/models")
    assert status == 307 and headers["location"] == "http://127.0.0.1:1/elsewhere"
    assert len(upstream.requests) == 1


def test_client_credentials_pass_through_without_upstream_key(daemon, upstream: FakeUpstream) -> None:
    d = daemon()
    anthropic_client(d, "sk-ant-the-clients-own-key").models.list()
    # Recent SDKs send the key as a bearer token; either way it arrives as the client sent it.
    sent = upstream.requests[-1]
    assert "sk-ant-the-clients-own-key" in (sent.header("x-api-key"), sent.header("authorization").removeprefix("Bearer "))
    openai_client(d, "sk-clients-own-openai-key").chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert upstream.requests[-1].header("authorization") == "Bearer sk-clients-own-openai-key"


def test_openai_path_mapping(daemon, upstream: FakeUpstream) -> None:
    d = daemon({"upstreams": {"openai": {"base_url": upstream.url + "/prefix"}}})
    raw_request(d, "GET", "/openai/v1/models?limit=2")
    assert upstream.requests[-1].path == "/prefix/v1/models?limit=2"


@pytest.mark.parametrize(("method", "path", "status", "kind"), [
    ("GET", "/nothing-here", 404, "not_found_error"),
    ("GET", "/v1/../openai/v1/models", 400, "invalid_request_error"),
    ("GET", "/v1/%2e%2e/x", 400, "invalid_request_error"),
    ("TRACE", "/v1/models", 405, "invalid_request_error"),
])
def test_own_errors(daemon, upstream: FakeUpstream, method: str, path: str, status: int, kind: str) -> None:
    d = daemon()
    got, headers, data = raw_request(d, method, path)
    assert got == status
    assert json.loads(data) == {"type": "error", "error": {"type": kind, "message": json.loads(data)["error"]["message"]}}
    assert headers["request-id"].startswith("req_ccp_")
    assert upstream.requests == []


def test_health_and_ready(daemon, upstream: FakeUpstream) -> None:
    d = daemon()
    for path, expected in (("/health", {"status": "ok"}), ("/ready", {"status": "ready"})):
        status, headers, data = raw_request(d, "GET", path)
        assert (status, json.loads(data)) == (200, expected)
        assert headers["request-id"]
    assert upstream.requests == []


def test_plain_http_needs_tls_disabled_and_warns(tmp_path, upstream: FakeUpstream) -> None:
    from tests.support.daemon import Daemon

    d = Daemon(tmp_path, {"server": {"tls": {"enabled": False}},
                          "upstreams": {"anthropic": {"base_url": upstream.url}}}).start()
    try:
        assert d.get("/health").status == 200
        assert "TLS is disabled" in d.log()
    finally:
        d.stop()


def test_self_signed_dev_certificate_made_on_first_start(tmp_path, upstream: FakeUpstream) -> None:
    from tests.support.daemon import Daemon

    d = Daemon(tmp_path, {"server": {"tls": {"enabled": True, "self_signed": True, "cert_file": "tls/c.pem",
                                             "key_file": "tls/k.pem"}},
                          "upstreams": {"anthropic": {"base_url": upstream.url}}})
    d.ca_file = str(tmp_path / "tls" / "c.pem")
    d.start()
    try:
        assert d.get("/health").status == 200  # verified against the certificate it wrote
        assert (tmp_path / "tls" / "k.pem").stat().st_mode & 0o777 == 0o600
    finally:
        d.stop()


def test_every_response_has_request_id_and_logs_carry_it(daemon, upstream: FakeUpstream, tmp_path) -> None:
    access = tmp_path / "access.log"
    d = daemon({"security": {"audit": {"enabled": True, "outputs": [
        {"type": "file", "path": str(access), "records": "access", "flush_interval": "50ms"}]}}})
    upstream.expect(Script(body=b"{}", headers={"content-type": "application/json", "request-id": "req_up_7"}))
    _, headers, _ = raw_request(d, "POST", "/v1/messages", {}, b"{}")
    assert headers["request-id"] == "req_up_7"  # the upstream's own id, passed through
    _, headers, _ = raw_request(d, "GET", "/nowhere")
    ours = headers["request-id"]
    assert ours.startswith("req_ccp_")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and ours not in (access.read_text() if access.exists() else ""):
        time.sleep(0.05)
    lines = [json.loads(line) for line in access.read_text().splitlines()]
    assert ours in [line["request_id"] for line in lines]
    assert ours not in d.log()  # per-request lines stay out of the daemon log (and so out of syslog)



# 100 MB of SSE events, for clients that do not read them.
BIG_EVENT = ("event: content_block_delta\ndata: {\"t\":\"" + "x" * 10_000 + "\"}\n\n").encode()
BIG_STREAM = 10_000


@contextlib.contextmanager
def unread_stream(d: Any, upstream: FakeUpstream, produced: list[int]) -> Iterator[ssl.SSLSocket]:
    """A TLS client that asks for the big stream, reads the first bytes, then nothing for now."""
    upstream.expect(Script(events=[BIG_EVENT] * BIG_STREAM, headers=SSE, before_event=produced.append))
    ctx = d.ssl_context()
    with socket.create_connection((d.host, d.port)) as raw, ctx.wrap_socket(raw, server_hostname="localhost") as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        s.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        s.recv(1024)
        yield s


def test_slow_client_slows_the_upstream_read(daemon, upstream: FakeUpstream) -> None:
    """Back-pressure: with a client that does not read, the proxy stops reading the upstream
    instead of buffering the stream in memory."""
    d = daemon()
    produced: list[int] = []
    whole = BIG_STREAM * len(BIG_EVENT)
    with unread_stream(d, upstream, produced) as s:
        # The client reads nothing: the upstream's production must come to a halt, far short of the
        # stream. (Without back-pressure the proxy would read the whole 100 MB in a few seconds.)
        stalled_at = wait_steady(lambda: len(produced), steady=1.0, what="the upstream's production")
        assert stalled_at < BIG_STREAM // 2, f"upstream produced {stalled_at} events to a client not reading"
        received = 0
        s.settimeout(30)
        while received < whole:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            received += len(chunk)
    assert len(produced) == BIG_STREAM
    assert received >= whole


def test_a_client_that_stops_reading_is_cut_after_send_timeout(daemon, upstream: FakeUpstream) -> None:
    """Slow read: a client that takes nothing of its stream loses the connection after send_timeout,
    and the upstream request is stopped with it."""
    d = daemon({"security": {"ddos_protection": {"send_timeout": "2s"}}})
    produced: list[int] = []
    with unread_stream(d, upstream, produced) as s:
        stopped_reading = time.monotonic()
        # Reads nothing: the buffers fill, then 2 s pass with nothing taken, and the daemon says so.
        wait_until(lambda: "reason=send_timeout" in d.log(), timeout=60, what="the send_timeout cut")
        assert time.monotonic() - stopped_reading >= 2.0  # not before the configured time
        wait_until(lambda: upstream.aborted, timeout=20, what="the upstream request to be stopped")
        stopped_at = len(produced)
        s.settimeout(10)
        received = 0
        try:
            while chunk := s.recv(1 << 20):
                received += len(chunk)
        except (ConnectionResetError, ssl.SSLError):
            pass
    assert received < BIG_STREAM * len(BIG_EVENT) // 2  # what was buffered, then the cut: not the stream
    assert stopped_at < BIG_STREAM // 2 and len(produced) == stopped_at  # the upstream stopped with it
