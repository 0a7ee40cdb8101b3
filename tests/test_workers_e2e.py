"""`server.workers: 2`: a supervisor and two workers on one socket, with the real daemon."""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ccproxy.audit.verify import verify
from tests.support.daemon import Daemon
from tests.support.upstream import FakeUpstream, Script, message_json
from tests.support.workers import (
    Stream,
    alive,
    connect,
    log_match,
    parallel,
    request,
    spread_connections,
    terminate,
    wait_for,
    which_worker,
)


def _ready(d: Daemon) -> tuple[dict[str, Any], dict[str, str]]:
    conn = http.client.HTTPSConnection(d.host, d.port, timeout=10, context=d.ssl_context())
    try:
        conn.request("GET", "/ready")
        response = conn.getresponse()
        body = response.read()
        assert response.status == 200, (response.status, body)
        return json.loads(body), {k.lower(): v for k, v in response.getheaders()}
    finally:
        conn.close()


def _answers(d: Daemon, count: int = 16) -> list[tuple[dict[str, Any], dict[str, str]]]:
    """`count` /ready answers fetched at once, each on its own connection, so the kernel hands the
    connections to both workers."""
    out: list[tuple[dict[str, Any], dict[str, str]]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(count)

    def one() -> None:
        barrier.wait()
        answer = _ready(d)
        with lock:
            out.append(answer)

    threads = [threading.Thread(target=one) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(out) == count
    return out


def _by_worker(d: Daemon, check: Callable[[dict[str, Any], dict[str, str]], bool] = lambda i, h: True,
               workers: int = 2) -> dict[int, tuple[dict[str, Any], dict[str, str]]]:
    """An answer from every worker (asking until each has answered), each passing `check`."""
    seen: dict[int, tuple[dict[str, Any], dict[str, str]]] = {}

    def all_seen() -> bool:
        for info, headers in _answers(d):
            if check(info, headers):
                seen[info["worker"]] = (info, headers)
        return len(seen) == workers

    wait_for(all_seen, timeout=60)
    return seen


@pytest.fixture
def workers(daemon: Callable[..., Daemon]) -> Callable[..., Daemon]:
    def start(config: dict[str, Any] | None = None) -> Daemon:
        config = dict(config or {})
        config.setdefault("server", {})["workers"] = 2
        # These tests need no admin socket (tests/test_workers_admin_e2e.py covers it).
        config.setdefault("admin", {}).setdefault("enabled", False)
        d = daemon(config)
        wait_for(lambda: _ready(d)[0]["workers"] == {"ready": 2, "configured": 2}, timeout=60)
        return d

    return start


def test_two_workers_serve_one_socket_and_report_their_health(workers: Callable[..., Daemon]) -> None:
    d = workers()
    seen = _by_worker(d)
    pids = {info["pid"] for info, _ in seen.values()}
    assert len(pids) == 2 and d.proc is not None and d.proc.pid not in pids
    for info, _ in seen.values():
        assert info["status"] == "ready" and info["workers"] == {"ready": 2, "configured": 2}
    assert len(log_match(d, r"worker \d \(pid \d+\) ready; \d of 2 workers ready")) == 2
    assert "starting 2 workers" in d.log()
    assert request(d, "/v1/models")[0] == 200


def test_a_killed_worker_is_replaced_while_the_other_keeps_serving(workers: Callable[..., Daemon]) -> None:
    d = workers()
    seen = _by_worker(d)
    victim = seen[1][0]["pid"]
    survivor = seen[2][0]["pid"]
    with Stream(d, ["/ready", "/v1/models"], threads=3) as stream:
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: not alive(victim))
        died = wait_for(lambda: log_match(d, rf"worker 1 \(pid {victim}\) died \(signal 9\); 1 of 2 workers ready; "
                                             r"restarting it in ([\d.]+) s"))
        assert float(died[0].group(1)) == 0.5
        # The survivor reports the loss until the replacement is ready.
        wait_for(lambda: _ready(d)[0]["workers"]["ready"] == 2, timeout=60)
    # Only connections the dead worker had accepted could fail: the others were all served.
    assert stream.count() > 0
    replaced = _by_worker(d, lambda info, h: info["workers"]["ready"] == 2)
    assert replaced[1][0]["pid"] not in (victim, survivor)
    assert replaced[2][0]["pid"] == survivor
    assert d.proc is not None and d.proc.poll() is None


def test_sighup_reloads_every_worker_with_the_same_checked_config(workers: Callable[..., Daemon]) -> None:
    d = workers()
    config = dict(d.config)
    config["server"] = {**config["server"], "security_headers": {"headers": {"X-Generation": "2"}}}
    d.write_config(config)
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: len(log_match(d, r"config reloaded from .*; changed: \['[a-z_.]*security_headers[a-z_.]*'\]")) == 2)
    assert "config checked; sent to 2 workers" in d.log()
    seen = _by_worker(d, lambda info, headers: headers.get("x-generation") == "2")
    assert set(seen) == {1, 2}

    # An invalid file reaches no worker: both keep serving the config they have.
    d.config_path.write_text("server: {workers: 2, port: [\n")
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "config reload refused by the supervisor; no worker reloads" in d.log())
    assert len(log_match(d, r"config reloaded from")) == 2
    for info, headers in _answers(d):
        assert headers.get("x-generation") == "2", info


def test_sigterm_drains_every_worker(workers: Callable[..., Daemon], upstream: FakeUpstream) -> None:
    d = workers()
    # Slow requests in flight on both workers when SIGTERM arrives: each is answered in full.
    upstream.expect(*[Script(body=b'{"slow":true}', headers={"content-type": "application/json"}, delay=1.5)
                      for _ in range(8)])
    results: list[tuple[int, bytes]] = []
    threads = [threading.Thread(target=lambda: results.append(request(d, "/v1/models"))) for _ in range(8)]
    for t in threads:
        t.start()
    wait_for(lambda: len(upstream.requests) >= 8)
    assert d.proc is not None
    d.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(30)
    # twistd exits by the signal it was stopped with, once its services have stopped.
    assert d.proc.wait(60) == -signal.SIGTERM
    assert results == [(200, b'{"slow":true}')] * 8
    log = d.log()
    assert len(log_match(d, r"draining: worker \d: the supervisor asked")) == 2
    assert len(log_match(d, r"worker \d \(pid \d+\) exited")) == 2
    assert log.count("drained; exiting") == 2
    with pytest.raises(OSError):
        request(d, "/ready", timeout=2)


def test_workers_drain_for_server_drain_timeout_then_cut(workers: Callable[..., Daemon], upstream: FakeUpstream) -> None:
    # Each worker drains as one process does at shutdown, for server.drain_timeout (1 s here): its
    # idle kept-alive connections close at once, and a request still under way then is cut with
    # its access line and event. The upstream would answer after 60 s, well after any default.
    d = workers({"server": {"drain_timeout": "1s"}})
    conns = spread_connections(d, 8)
    slow = {worker: conn for worker, conn in conns}  # one connection per worker carries a slow request
    idle = [conn for _, conn in conns if conn not in slow.values()]
    upstream.expect(*[Script(body=b'{"slow":true}', headers={"content-type": "application/json"}, delay=60)
                      for _ in slow])

    def slow_request(conn: http.client.HTTPConnection) -> object:
        try:
            conn.request("GET", "/v1/models", headers={"x-api-key": "client-key", "anthropic-version": "2023-06-01"})
            return conn.getresponse().status
        except (OSError, http.client.HTTPException) as e:
            return type(e).__name__

    results: list[object] = []
    threads = [threading.Thread(target=lambda c=conn: results.append(slow_request(c))) for conn in slow.values()]
    for t in threads:
        t.start()
    wait_for(lambda: len(upstream.requests) >= len(slow))
    assert d.proc is not None
    d.proc.send_signal(signal.SIGTERM)
    # Long before the upstream answers, and before a fixed 30 s drain (and the supervisor's kill
    # 5 s later) would end, every process is gone.
    assert d.proc.wait(25) == -signal.SIGTERM
    for t in threads:
        t.join(30)
    assert len(results) == 2 and 200 not in results, results
    assert len(log_match(d, r"draining: worker \d: the supervisor asked; .* for up to 1 s")) == 2
    assert len(log_match(d, r"drain: 1 request\(s\) still under way after drain_timeout=1s were cut")) == 2
    assert len(log_match(d, r"request_timeout.*drain_timeout")) >= 2
    for conn in idle:  # closed by the drain: the next request on it finds no server
        with pytest.raises((OSError, http.client.HTTPException)):
            which_worker(conn)


def test_restart_of_a_supervisor_under_a_steady_stream(workers: Callable[..., Daemon], tmp_path: Path) -> None:
    access_file = tmp_path / "access.log"
    d = workers({"security": {"audit": {"outputs": [
        {"type": "file", "path": str(access_file), "records": "access", "flush_interval": "50ms"}]}}})
    successor = 0
    try:
        with Stream(d, ["/v1/models", "/ready"], threads=4) as stream:
            wait_for(lambda: stream.count() >= 20)
            assert d.proc is not None
            d.proc.send_signal(signal.SIGUSR2)
            successor = int(wait_for(lambda: log_match(d, r"started successor pid (\d+)"))[0].group(1))
            assert d.proc.wait(90) == 0
            before = stream.count()
            wait_for(lambda: stream.count() >= before + 20)
        assert stream.failures == [], stream.failures[:5]
        assert alive(successor)
        assert f"supervisor (pid {successor}) listening on" in d.log()
        new = _by_worker(d)
        assert {info["workers"]["configured"] for info, _ in new.values()} == {2}
        wait_for(lambda: "audit trail started" in d.log())
    finally:
        if successor:
            terminate(successor, timeout=40)
    # One writer at a time: the new supervisor's trail starts after the old one has exited.
    access = [json.loads(line) for line in access_file.read_text().splitlines()]
    assert [r["seq"] for r in access] == list(range(1, len(access) + 1))
    assert len(access) >= stream.count()
    assert verify([str(access_file)]).ok


BODY = json.dumps({"model": "claude-sonnet-4-6", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})


def _post(conn: http.client.HTTPConnection, key: str) -> int:
    conn.request("POST", "/v1/messages", BODY, {"content-type": "application/json", "x-api-key": key})
    response = conn.getresponse()
    response.read()
    return response.status


def test_a_per_key_limit_is_exact_across_workers(workers: Callable[..., Daemon], upstream: FakeUpstream) -> None:
    d = workers({
        "upstreams": {"anthropic": {"api_key": "sk-ant-upstream-key-000000000000f3a9"}},
        "security": {
            "auth": {"enabled": True, "type": "api_key", "api_keys": [{"key": "client-key-of-twenty-01", "id": "k20"}]},
            "rate_limiting": {"per_key": {"default": {"requests_per_minute": 10_000, "daily_quota": 20}}},
        },
    })
    conns = spread_connections(d, 60)
    statuses = parallel([lambda c=conn: _post(c, "client-key-of-twenty-01") for _, conn in conns])  # type: ignore[misc]
    by_worker = {w: [s for (worker, _), s in zip(conns, statuses, strict=True) if worker == w] for w in (1, 2)}
    assert sorted(statuses) == [200] * 20 + [429] * 40, statuses
    # Both workers answered, and between them admitted exactly the quota.
    assert all(len(v) >= 15 for v in by_worker.values()), by_worker
    assert sum(1 for r in upstream.requests if r.path == "/v1/messages") == 20
    for _, conn in conns:
        conn.close()


def test_max_connections_per_ip_is_exact_across_workers(workers: Callable[..., Daemon]) -> None:
    d = workers({"security": {"ddos_protection": {"max_connections_per_ip": 10}}})

    def attempt() -> dict[int, int]:
        """14 connections at once: which worker served each of those admitted."""
        conns = [connect(d, timeout=10) for _ in range(14)]
        answers = parallel([lambda c=c: which_worker(c) for c in conns])  # type: ignore[misc]
        served = [a for a in answers if isinstance(a, int)]
        refused = [a for a in answers if not isinstance(a, int)]
        assert len(served) == 10 and len(refused) == 4, answers
        assert all(isinstance(e, OSError | http.client.HTTPException) for e in refused), refused
        for conn in conns:
            conn.close()
        return {w: served.count(w) for w in set(served)}

    # Until the kernel has spread the admitted connections over both workers (usually at once).
    spreads = []
    while not spreads or len(spreads[-1]) < 2:
        if spreads:
            wait_for(lambda: _ready(d)[0]["status"] == "ready")  # the slots came back
        spreads.append(attempt())
        assert len(spreads) < 10, spreads
    assert len(log_match(d, r"connection_refused .*reason=too_many_connections_per_ip")) >= 4


def test_the_audit_trail_is_one_chain_written_by_the_supervisor(workers: Callable[..., Daemon],
                                                                 tmp_path: Path) -> None:
    audit_file, access_file = tmp_path / "audit.log", tmp_path / "access.log"
    d = workers({
        "upstreams": {"anthropic": {"api_key": "sk-ant-upstream-key-000000000000f3a9"}},
        "security": {
            "auth": {"enabled": True, "type": "api_key", "api_keys": [{"key": "client-key-audited-0001", "id": "ka"}]},
            "audit": {"outputs": [
                {"type": "file", "path": str(audit_file), "flush_interval": "50ms"},
                {"type": "file", "path": str(access_file), "records": "access", "flush_interval": "50ms"},
            ]},
        },
    })
    conns = spread_connections(d, 20)
    statuses = parallel([lambda c=conn: _post(c, "client-key-audited-0001") for _, conn in conns])  # type: ignore[misc]
    statuses += parallel([lambda c=conn: _post(c, "wrong-key-000000000000") for _, conn in conns[:6]])  # type: ignore[misc]
    assert statuses == [200] * 20 + [401] * 6
    for _, conn in conns:
        conn.close()
    # A worker killed right after answering: what it recorded has already left it.
    victim = next(info["pid"] for info, _ in _by_worker(d).values() if info["worker"] == 1)
    os.kill(victim, signal.SIGKILL)
    assert d.stop() == -signal.SIGTERM
    records = [json.loads(line) for line in audit_file.read_text().splitlines()]
    names = [r["event"] for r in records]
    assert names.count("authentication_success") == 20 and names.count("authentication_failure") == 6
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    report = verify([str(audit_file)])
    assert report.ok, report.message
    access = [json.loads(line) for line in access_file.read_text().splitlines()]
    assert sum(1 for r in access if r["path"] == "/v1/messages") == 26
    assert verify([str(access_file)]).ok


def _budget_config(workers: int) -> dict[str, Any]:
    return {
        "server": {"workers": workers},
        "admin": {"enabled": False},
        "upstreams": {"anthropic": {"api_key": "sk-ant-upstream-key-000000000000f3a9"}},
        "security": {
            "auth": {"enabled": True, "type": "api_key", "api_keys": [{"key": "client-key-of-tokens-01", "id": "kt"}]},
            "rate_limiting": {"per_key": {"default": {"requests_per_minute": 10_000, "daily_token_quota": 1000}}},
        },
    }


def _refusal(conn: http.client.HTTPConnection) -> tuple[int, dict[str, str], dict[str, Any]]:
    conn.request("POST", "/v1/messages", BODY, {"content-type": "application/json",
                                                 "x-api-key": "client-key-of-tokens-01"})
    response = conn.getresponse()
    body = json.loads(response.read())
    headers = {k.lower(): v for k, v in response.getheaders() if "tokens" in k.lower() or k.lower() == "retry-after"}
    return response.status, headers, body


def _spend(d: Daemon, upstream: FakeUpstream, conns: list[http.client.HTTPConnection]) -> list[Any]:
    """Four requests of 300 tokens each (1,200 of a 1,000-token day), over `conns` in turn; then
    what the next request on each connection gets."""
    usage = {"input_tokens": 200, "output_tokens": 100}
    upstream.responder = lambda recorded: Script(
        body=json.dumps({**message_json(), "usage": usage}).encode(), headers={"content-type": "application/json"})
    statuses = [_post(conns[i % len(conns)], "client-key-of-tokens-01") for i in range(4)]
    assert statuses == [200] * 4
    return [_refusal(conn) for conn in conns]


def test_a_token_budget_spent_through_both_workers_refuses_on_either_as_one_process_does(
        daemon: Callable[..., Daemon], workers: Callable[..., Daemon], upstream: FakeUpstream) -> None:
    d = workers(_budget_config(2))
    held = spread_connections(d, 4)
    by_worker = {w: conn for w, conn in held}
    assert sorted(by_worker) == [1, 2]
    conns = [by_worker[1], by_worker[2]]
    refused = _spend(d, upstream, conns)
    for conn in (c for _, c in held):
        conn.close()
    # Both workers served the spending (alternately), and both refuse the next request.
    assert sum(1 for r in upstream.requests if r.path == "/v1/messages") == 4
    assert [status for status, _, _ in refused] == [429, 429], refused
    assert len(log_match(d, r"rate_limit_exceeded .*limit=daily_token_quota")) == 2
    d.stop()
    # The same requests against one process: the same refusal, status, headers and body.
    one = daemon(_budget_config(1))
    single = _spend(one, upstream, [connect(one)])
    assert sum(1 for r in upstream.requests if r.path == "/v1/messages") == 8
    status, headers, body = single[0]
    assert status == 429 and body["error"]["type"] == "rate_limit_error"
    assert headers["anthropic-ratelimit-tokens-limit"] == "1000"
    assert headers["anthropic-ratelimit-tokens-remaining"] == "0"
    for got_status, got_headers, got_body in refused:
        assert got_status == status
        assert sorted(got_headers) == sorted(headers)
        assert {k: v for k, v in got_headers.items() if not _moving(k)} == \
            {k: v for k, v in headers.items() if not _moving(k)}
        assert got_body["type"] == body["type"] and got_body["error"]["type"] == body["error"]["type"]
        assert got_body["error"]["message"].split(";")[0] == body["error"]["message"].split(";")[0]


def _moving(name: str) -> bool:
    """Headers that count down to the day's reset: a second apart between two daemons."""
    return name == "retry-after" or name.endswith("-reset") or name.startswith("x-ratelimit-reset")
