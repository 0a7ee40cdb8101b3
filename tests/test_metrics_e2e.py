"""Metrics of the real daemon after a known mix of requests, read with prometheus_client's parser."""

from __future__ import annotations

import datetime
import hashlib
import json
import socket
import ssl
import time
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.support.admin import security
from tests.support.authkit import UPSTREAM_KEYS
from tests.support.daemon import Daemon, free_port
from tests.support.upstream import FakeUpstream, Script, anthropic_stream
from tests.test_incident_e2e import MESSAGE, connect, post, status_from

KEY = "ccp_metrics-client-key-000000000qzvkwx"


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def raw(d: Daemon, data: bytes) -> bytes:
    with socket.create_connection((d.host, d.port), timeout=5) as s:
        tls = d.ssl_context().wrap_socket(s, server_hostname="localhost")
        tls.sendall(data)
        out = b""
        while chunk := tls.recv(65536):
            out += chunk
        return out


def test_metrics_count_a_known_mix_exactly(daemon: Any, upstream: FakeUpstream) -> None:
    port = free_port()
    d = daemon({
        "admin": {"metrics": {"enabled": True, "listen": f"127.0.0.1:{port}"}},
        "upstreams": {name: {"api_key": key} for name, key in UPSTREAM_KEYS.items()},
        "security": {"auth": {"enabled": True, "api_keys": [
            {"id": "m", "key_sha256": hashlib.sha256(KEY.encode()).hexdigest(),
             "expires": "2031-01-02T03:04:05Z"},
        ]}},
    })
    before = scrape(port)
    conn = connect(d, "127.0.0.1")
    for _ in range(3):
        assert post(conn, KEY)[0] == 200
    assert post(conn, "ccp_wrong-key-000000000000000000000")[0] == 401
    assert post(conn, "ccp_wrong-key-000000000000000000001")[0] == 401
    assert post(conn, None)[0] == 401
    conn.request("POST", "/openai/v1/chat/completions", body=json.dumps({"model": "gpt-4o", "messages": []}),
                 headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"})
    assert conn.getresponse().read() and True
    conn.request("GET", "/nowhere", headers={"x-api-key": KEY})
    response = conn.getresponse()
    response.read()
    assert response.status == 404
    events = anthropic_stream(["a", "b", "c"])
    upstream.expect(Script(headers={"content-type": "text/event-stream"}, events=events))
    conn.request("POST", "/v1/messages", body=json.dumps({**MESSAGE, "stream": True}),
                 headers={"x-api-key": KEY, "content-type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.read().count(b"\n\n") == len(events)
    upstream.expect(Script(status=500, body=b'{"type":"error","error":{"type":"api_error","message":"x"}}',
                           headers={"content-type": "application/json"}))
    assert post(conn, KEY)[0] == 500
    conn.close()
    assert raw(d, b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert security(d, "block-ip", "127.0.0.2").returncode == 0
    assert status_from(d, KEY) == "refused"
    time.sleep(0.2)

    after = scrape(port)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("ccproxy_requests_total", api="anthropic", route="messages", status="200") == 4
    assert delta("ccproxy_requests_total", api="anthropic", route="messages", status="401") == 3
    assert delta("ccproxy_requests_total", api="anthropic", route="messages", status="500") == 1
    assert delta("ccproxy_requests_total", api="openai", route="chat_completions", status="200") == 1
    assert delta("ccproxy_requests_total", api="anthropic", route="none", status="404") == 1
    assert delta("ccproxy_auth_failures_total", reason="invalid_api_key") == 2
    assert delta("ccproxy_auth_failures_total", reason="missing_credentials") == 1
    assert delta("ccproxy_requests_refused_total", reason="auth") == 3
    assert delta("ccproxy_requests_refused_total", reason="malformed") == 1
    assert delta("ccproxy_stream_events_total", api="anthropic") == len(events)
    assert delta("ccproxy_upstream_errors_total", upstream="anthropic", kind="status_5xx") == 1
    assert delta("ccproxy_connections_refused_total", reason="ip_auto_blocked") == 1
    assert delta("ccproxy_request_duration_seconds_count", api="anthropic") == 9
    assert delta("ccproxy_upstream_duration_seconds_count", upstream="anthropic") == 5
    assert value(after, "ccproxy_blocked_ips") == 1
    assert value(after, "ccproxy_emergency_mode") == 0
    assert value(after, "ccproxy_state_backend_up") == 1
    assert value(after, "ccproxy_api_key_expiry_timestamp_seconds", key_id="m") == datetime.datetime(
        2031, 1, 2, 3, 4, 5, tzinfo=datetime.UTC).timestamp()
    assert value(after, "ccproxy_tls_certificate_expiry_timestamp_seconds") > time.time()
    assert value(after, "ccproxy_audit_queue_depth") == 0
    # No label carries an address, a path or a key.
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for secret in ("127.0.0.2", "/nowhere", KEY[-8:], "wrong-key"):
        assert secret not in text
    # The public port serves no metrics.
    assert d.get("/metrics").status == 404
    # Emergency mode and a refused reload show.
    assert security(d, "emergency", "--enable").returncode == 0
    assert "refused" in d.reload("server: [not, a, mapping]\n")
    after = scrape(port)
    assert value(after, "ccproxy_emergency_mode") == 1
    assert value(after, "ccproxy_config_reloads_total", result="refused") == 1


def test_metrics_off_by_default_and_not_on_the_public_port(daemon: Any) -> None:
    d = daemon()
    assert "metrics on http" not in d.log()
    ctx = ssl.create_default_context(cafile=d.ca_file)
    try:
        urllib.request.urlopen(d.url + "/metrics", timeout=5, context=ctx)
    except urllib.error.HTTPError as e:
        assert e.code == 404
