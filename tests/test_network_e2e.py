"""Connection hardening against the real daemon, over real loopback sockets and TLS."""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
import time
import urllib.request
from typing import Any

from tests.support.clients import anthropic_client
from tests.support.net import refused, server_connections, still_open, tcp
from tests.support.upstream import FakeUpstream, Script, anthropic_stream
from tests.support.waiting import wait_until


def tls(d: Any, source: str | None = None) -> ssl.SSLSocket:
    return d.ssl_context().wrap_socket(tcp(d, source), server_hostname="localhost")


def no_connections_left(d: Any) -> None:
    """Wait until the daemon holds no connection (the readiness probe's, or one a test closed)."""
    wait_until(lambda: server_connections(d.port) == 0, what="the daemon to close its connections")


def get(s: ssl.SSLSocket, path: str = "/health") -> bytes:
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += s.recv(65536)
    return head


def https_get(d: Any, path: str = "/health") -> Any:
    try:
        return urllib.request.urlopen(d.url + path, timeout=10, context=d.ssl_context())
    except urllib.error.HTTPError as e:
        return e


def test_trickling_head_gets_408_at_header_timeout_while_others_served(daemon) -> None:
    d = daemon({"security": {"ddos_protection": {"header_timeout": "2s"}}})
    slow = tls(d)
    result: dict[str, Any] = {}

    def trickle() -> None:
        request = b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"a" * 100
        slow.settimeout(1.0)  # one byte a second; the wait for the next byte watches for the answer
        started = time.monotonic()
        for byte in request[:20]:  # 20 s: ten times the deadline; a deadline reset by each byte never comes
            slow.send(bytes([byte]))
            try:
                result["answer"] = slow.recv(4096)
            except TimeoutError:
                continue
            result["after"] = time.monotonic() - started
            return

    thread = threading.Thread(target=trickle)
    thread.start()
    served = 0
    while thread.is_alive():
        assert https_get(d).status == 200
        served += 1
        time.sleep(0.1)
    thread.join()
    assert "answer" in result, "no answer to a head trickled for 20 s with a 2 s header deadline"
    assert result["answer"].startswith(b"HTTP/1.1 408")
    assert b'"timeout_error"' in result["answer"] or b"request-id" in result["answer"]
    # The deadline runs from the first byte, which left after `started`: never before 2 s; a slow
    # runner can only add to it.
    assert 2.0 <= result["after"] < 10.0, result
    assert served >= 3  # others were served meanwhile


def test_max_connections_plus_one_leaves_exactly_max_open(daemon) -> None:
    d = daemon({"security": {"ddos_protection": {"max_connections": 5, "max_connections_per_ip": 5}}})
    no_connections_left(d)  # the readiness probe's
    conns = []
    for i in range(5):
        conns.append(tcp(d))
        wait_until(lambda n=i + 1: server_connections(d.port) == n, what=f"connection {i + 1} at the daemon")
    conns.append(tcp(d))
    assert refused(conns[5])
    assert all(still_open(c) for c in conns[:5])
    # Every connection already open keeps working, TLS and all.
    wrapped = [d.ssl_context().wrap_socket(c, server_hostname="localhost") for c in conns[:5]]
    assert all(get(w).startswith(b"HTTP/1.1 200") for w in wrapped)
    wrapped[0].close()
    wait_until(lambda: server_connections(d.port) == 4, what="the daemon to close the connection")
    assert get(tls(d)).startswith(b"HTTP/1.1 200")  # the count dropped with the close
    for w in wrapped[1:]:
        w.close()
    assert "too_many_connections" in d.log()


def test_per_ip_cap_counts_each_address(daemon) -> None:
    d = daemon({"security": {"ddos_protection": {"max_connections": 50, "max_connections_per_ip": 2}}})
    no_connections_left(d)  # the readiness probe's
    one = [tls(d, "127.0.0.1"), tls(d, "127.0.0.1")]
    two = [tls(d, "127.0.0.2"), tls(d, "127.0.0.2")]
    third = tcp(d, "127.0.0.1")
    assert refused(third)
    assert all(get(s).startswith(b"HTTP/1.1 200") for s in one + two)
    assert refused(tcp(d, "127.0.0.2"))
    assert "too_many_connections_per_ip" in d.log()
    for s in one + two:
        s.close()


def test_ip_lists_refuse_at_accept_and_follow_reload(daemon) -> None:
    config = {"security": {"ip_blacklist": {"enabled": True, "ips": ["127.0.0.2/32"]}}}
    d = daemon(config)
    assert refused(tcp(d, "127.0.0.2"))  # closed before any TLS byte
    assert get(tls(d, "127.0.0.3")).startswith(b"HTTP/1.1 200")
    config = d.config
    config["security"] = {"ip_whitelist": {"enabled": True, "ips": ["127.0.0.1/32", "127.0.0.2/32"]},
                          "ip_blacklist": {"enabled": True, "ips": ["127.0.0.1/32"]}}
    assert "config reloaded" in d.reload(config)
    assert get(tls(d, "127.0.0.2")).startswith(b"HTTP/1.1 200")
    assert refused(tcp(d, "127.0.0.3"))  # not on the whitelist
    assert refused(tcp(d, "127.0.0.1"))  # blacklisted though whitelisted: the blacklist wins
    log = d.log()
    assert "ip_blacklisted" in log and "not_whitelisted" in log


def test_sse_longer_than_every_timeout_arrives_whole(daemon, upstream: FakeUpstream) -> None:
    d = daemon({"security": {"ddos_protection": {"header_timeout": "1s", "read_timeout": "1s",
                                                 "tls_handshake_timeout": "1s", "idle_timeout": "1s"}}})
    deltas = [f"part{i} " for i in range(10)]
    upstream.expect(Script(events=anthropic_stream(deltas), event_gap=0.3,
                           headers={"content-type": "text/event-stream"}))
    client = anthropic_client(d)
    started = time.monotonic()
    text = ""
    with client.messages.stream(model="claude-sonnet-4-6", max_tokens=50,
                                messages=[{"role": "user", "content": "hi"}]) as stream:
        for piece in stream.text_stream:
            text += piece
    assert time.monotonic() - started > 3.0  # longer than every deadline, three times over
    assert text == "".join(deltas)


def test_security_headers_and_size_limit_on_real_responses(daemon, upstream: FakeUpstream) -> None:
    d = daemon({"security": {"ddos_protection": {"max_request_size": 1000}}})
    upstream.expect(Script(body=b"{}", headers={"content-type": "application/json",
                                                "x-frame-options": "SAMEORIGIN"}))
    ok = https_get(d, "/v1/models")
    assert ok.status == 200
    assert ok.headers["x-frame-options"] == "SAMEORIGIN"  # the upstream's own is kept
    assert ok.headers["x-content-type-options"] == "nosniff"
    assert ok.headers["strict-transport-security"].startswith("max-age=")
    missing = https_get(d, "/nowhere")
    assert missing.status == 404 and missing.headers["x-frame-options"] == "DENY"

    conn = http.client.HTTPSConnection("127.0.0.1", d.port, context=d.ssl_context(), timeout=10)
    conn.putrequest("POST", "/v1/messages")
    conn.putheader("Content-Length", "5000")
    conn.endheaders()
    response = conn.getresponse()
    body = response.read()
    assert response.status == 413 and b"request_too_large" in body
    assert response.headers["request-id"].startswith("req_ccp_")
    assert response.headers["x-content-type-options"] == "nosniff"
    assert not [r for r in upstream.requests if r.path == "/v1/messages"]


def test_handshake_deadline_and_idle_timeout_on_real_sockets(daemon) -> None:
    # Two different values, so each cut is known by when it comes: the handshake one before the idle
    # one could. Each clock starts before the daemon's could, so a cut can come later, never earlier.
    d = daemon({"security": {"ddos_protection": {"tls_handshake_timeout": "1s", "idle_timeout": "4s"}}})
    started = time.monotonic()
    silent = tcp(d)
    assert refused(silent, wait=20)  # no ClientHello: cut without a reply
    assert 1.0 <= time.monotonic() - started < 4.0  # the handshake deadline, not the idle one
    kept = tls(d)
    started = time.monotonic()
    assert get(kept).startswith(b"HTTP/1.1 200")
    kept.settimeout(20)
    assert kept.recv(1) == b""  # the idle keep-alive connection is closed quietly
    assert 4.0 <= time.monotonic() - started < 20.0


def test_proxy_protocol_names_the_client_before_tls(daemon) -> None:
    d = daemon({"security": {"ip_blacklist": {"ips": ["198.51.100.0/24"]}}})
    # Switched on by a reload: the readiness probe at startup speaks no PROXY header.
    config = d.config
    config["server"].update({"proxy_protocol": True, "trusted_proxies": ["127.0.0.0/8"]})
    assert "config reloaded" in d.reload(config)

    def via_balancer(client: str) -> socket.socket:
        s = tcp(d)
        s.sendall(f"PROXY TCP4 {client} 127.0.0.1 40000 {d.port}\r\n".encode())
        return s

    good = d.ssl_context().wrap_socket(via_balancer("203.0.113.8"), server_hostname="localhost")
    assert get(good).startswith(b"HTTP/1.1 200")
    bad = via_balancer("198.51.100.9")
    bad.sendall(b"\x16\x03\x01")  # the first bytes of a ClientHello: refused before any TLS reply
    assert refused(bad)
    assert "connection_refused reason=ip_blacklisted ip_address=198.51.100.9" in d.log()
    plain = tcp(d)
    plain.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert refused(plain)  # no PROXY header: dropped
