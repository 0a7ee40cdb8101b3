"""`server.workers: 2` with the admin socket and metrics: the supervisor serves them for both
workers. Real daemon, the real `ccproxy security` command, Prometheus' own parser."""

from __future__ import annotations

import http.client
import json
import os
import signal
import stat
from collections.abc import Callable
from typing import Any

import pytest

from tests.support.admin import security, security_json
from tests.support.daemon import Daemon, free_port
from tests.support.workers import alive, log_match, ready, spread_connections, terminate, wait_for, which_worker
from tests.test_incident_e2e import BLOCKED_SOURCE, assert_closed, status_from
from tests.test_metrics_e2e import scrape


@pytest.fixture
def service(daemon: Callable[..., Daemon]) -> Callable[..., Daemon]:
    def start(config: dict[str, Any] | None = None) -> Daemon:
        config = dict(config or {})
        config.setdefault("server", {})["workers"] = 2
        d = daemon(config)
        wait_for(lambda: ready(d)["workers"] == {"ready": 2, "configured": 2}, timeout=60)
        return d

    return start


def _from(d: Daemon, source: str) -> http.client.HTTPSConnection:
    return http.client.HTTPSConnection(d.host, d.port, timeout=10, context=d.ssl_context(),
                                       source_address=(source, 0))


def _on_each_worker(d: Daemon, source: str, per_worker: int = 1) -> dict[int, list[http.client.HTTPSConnection]]:
    """Kept-alive connections from `source`, at least `per_worker` on each worker."""
    held: dict[int, list[http.client.HTTPSConnection]] = {}

    def enough() -> bool:
        conn = _from(d, source)
        held.setdefault(which_worker(conn), []).append(conn)
        return len(held) == 2 and all(len(c) >= per_worker for c in held.values())

    wait_for(enough, timeout=60, step=0)
    return held


def _get(conn: http.client.HTTPConnection, path: str, key: str | None = None) -> int:
    conn.request("GET", path, headers={"x-api-key": key} if key else {})
    response = conn.getresponse()
    response.read()
    return response.status


def test_block_through_the_socket_reaches_both_workers_and_unblock_restores(service: Callable[..., Daemon]) -> None:
    d = service()
    mode = os.stat(d.admin_socket).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    held = _on_each_worker(d, BLOCKED_SOURCE)
    done = security(d, "block-ip", BLOCKED_SOURCE, "--duration", "1h", "--reason", "key guessing")
    assert done.returncode == 0, done.stderr
    # Each worker closes the address's open connection, and refuses new ones at accept.
    for conns in held.values():
        assert_closed(conns[0])
    assert [status_from(d) for _ in range(12)] == ["refused"] * 12
    # Others are served by both workers.
    others = _on_each_worker(d, "127.0.0.1")
    assert set(others) == {1, 2}
    status = security_json(d, "status")
    assert status["workers"] == {"ready": 2, "configured": 2, "answered": 2}
    assert status["pid"] == d.proc.pid and status["blocked"] == 1 and status["operator_blocks"] == 1
    assert status["connections"] >= 2  # the harness's connections held on both workers
    listed = security_json(d, "list-blocks")["blocks"]
    assert [(b["target"], b["reason"]) for b in listed] == [(BLOCKED_SOURCE, "key guessing")]

    # A worker started later (after a kill) refuses the address from its first connection.
    _kill_one_and_wait(d)
    assert [status_from(d) for _ in range(12)] == ["refused"] * 12

    done = security(d, "unblock-ip", BLOCKED_SOURCE)
    assert done.returncode == 0 and f"unblocked {BLOCKED_SOURCE}" in done.stdout, done.stderr
    assert set(_on_each_worker(d, BLOCKED_SOURCE)) == {1, 2}
    again = security(d, "unblock-ip", BLOCKED_SOURCE)
    assert again.returncode == 1 and "is not blocked" in again.stderr
    log = d.log()
    # Reported once, by the supervisor.
    assert log.count("ip_blocked ip_address=127.0.0.2 reason=key guessing by=uid=") == 1
    assert log.count("ip_unblocked ip_address=127.0.0.2 reason=unblocked by command by=uid=") == 1


def test_emergency_mode_reaches_both_workers_a_replaced_one_and_a_restart(service: Callable[..., Daemon]) -> None:
    # Auth off, so emergency mode's default profile (a ccproxy credential required) refuses all.
    d = service()
    held = _on_each_worker(d, "127.0.0.1")
    assert all(_get(c[0], "/v1/models", "sk-ant-client") == 200 for c in held.values())
    on = security(d, "emergency", "--enable")
    assert on.returncode == 0 and "emergency mode is on since" in on.stdout, on.stderr
    # Both workers close their open connections (security.emergency.close_connections) ...
    for conns in held.values():
        assert_closed(conns[0])
    # ... and refuse on new ones.
    for worker, conns in _on_each_worker(d, "127.0.0.1").items():
        assert _get(conns[0], "/v1/models", "sk-ant-client") == 401, worker
        assert json.loads(_ready_body(conns[0]))["emergency"] is True

    victim = _kill_one_and_wait(d)
    replaced = _on_each_worker(d, "127.0.0.1")
    pids = set()
    for conns in replaced.values():
        assert _get(conns[0], "/v1/models", "sk-ant-client") == 401
        pids.add(json.loads(_ready_body(conns[0]))["pid"])
    assert victim not in pids

    d.stop()
    d.start()
    wait_for(lambda: ready(d)["workers"] == {"ready": 2, "configured": 2}, timeout=60)
    for conns in _on_each_worker(d, "127.0.0.1").values():
        assert _get(conns[0], "/v1/models", "sk-ant-client") == 401
    assert security_json(d, "status")["emergency"] is True
    off = security(d, "emergency", "--disable")
    assert off.returncode == 0 and "emergency mode is off" in off.stdout
    for conns in _on_each_worker(d, "127.0.0.1").values():
        assert _get(conns[0], "/v1/models", "sk-ant-client") == 200


def _kill_one_and_wait(d: Daemon) -> int:
    """SIGKILL a worker; returns once its replacement is ready. Its pid."""
    pattern = r"worker \d \(pid \d+\) ready; 2 of 2 workers ready"
    before = len(log_match(d, pattern))
    victim: int = ready(d)["pid"]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: not alive(victim))
    wait_for(lambda: len(log_match(d, pattern)) > before, timeout=60)
    return victim


def _ready_body(conn: http.client.HTTPConnection) -> bytes:
    conn.request("GET", "/ready")
    response = conn.getresponse()
    return response.read()


def _served(samples: dict[Any, float], name: str = "ccproxy_requests_total") -> float:
    """Requests answered on the API routes (the /ready probes that find the workers left out)."""
    return sum(v for (n, labels), v in samples.items() if n == name and dict(labels).get("route") != "health")


def test_metrics_sum_both_workers_and_never_go_back_when_one_is_killed(service: Callable[..., Daemon]) -> None:
    port = free_port()
    d = service({"admin": {"metrics": {"enabled": True, "listen": f"127.0.0.1:{port}"}}})
    held = spread_connections(d, 2)
    assert {w for w, _ in held} == {1, 2}
    for i in range(10):
        assert _get(held[i % 2][1], "/v1/models", "sk-ant-client") == 200
    samples = scrape(port)
    assert _served(samples) == 10
    assert sum(v for (n, labels), v in samples.items()
               if n == "ccproxy_request_duration_seconds_count" and dict(labels)["api"] == "anthropic") == 10
    assert samples[("ccproxy_workers_up", ())] == 2 and samples[("ccproxy_workers_configured", ())] == 2
    assert samples[("ccproxy_connections_open", ())] >= 2
    assert samples[("ccproxy_blocked_ips", ())] == 0
    # One set of process figures: the supervisor's.
    assert samples[("process_resident_memory_bytes", ())] > 0

    for _, conn in held:
        conn.close()
    pattern = r"worker \d \(pid \d+\) ready; 2 of 2 workers ready"
    before = len(log_match(d, pattern))
    victim = ready(d)["pid"]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: not alive(victim))
    after = scrape(port)
    assert _served(after) == 10
    wait_for(lambda: len(log_match(d, pattern)) > before, timeout=60)
    held = spread_connections(d, 2)
    for i in range(4):
        assert _get(held[i % 2][1], "/v1/models", "sk-ant-client") == 200
    later = scrape(port)
    assert _served(later) == 14
    assert later[("ccproxy_worker_restarts_total", ())] == 1
    # The block gauge is the service's.
    assert security(d, "block-ip", "10.9.0.0/16").returncode == 0
    assert scrape(port)[("ccproxy_blocked_ips", ())] == 1


def test_after_a_restart_by_handover_the_socket_and_metrics_are_the_successors(
        service: Callable[..., Daemon]) -> None:
    port = free_port()
    d = service({"admin": {"metrics": {"enabled": True, "listen": f"127.0.0.1:{port}"}},
                 "server": {"drain_timeout": "2s"}})
    assert security(d, "block-ip", BLOCKED_SOURCE).returncode == 0
    assert d.proc is not None
    old = d.proc.pid
    d.proc.send_signal(signal.SIGUSR2)
    successor = int(wait_for(lambda: log_match(d, r"started successor pid (\d+)"))[0].group(1))
    try:
        assert d.proc.wait(90) == 0
        # The predecessor, going, left the successor's socket file in place.
        status = security_json(d, "status")
        assert status["pid"] == successor != old and status["operator_blocks"] == 1
        assert [status_from(d) for _ in range(8)] == ["refused"] * 8
        # The metrics port, held by the predecessor until it exited, is the successor's now.
        wait_for(lambda: ("ccproxy_workers_up", ()) in _scrape_or_none(port), timeout=30)
        assert security(d, "unblock-ip", BLOCKED_SOURCE).returncode == 0
        assert set(_on_each_worker(d, BLOCKED_SOURCE)) == {1, 2}
    finally:
        terminate(successor, timeout=40)


def _scrape_or_none(port: int) -> dict[Any, float]:
    try:
        return scrape(port)
    except OSError:
        return {}


def test_blocks_and_the_emergency_switch_are_shared_through_redis_with_another_instance(
        service: Callable[..., Daemon], daemon: Callable[..., Daemon], tmp_path: Any) -> None:
    from tests.support.redis import RedisServer

    redis = RedisServer(tmp_path).start()
    try:
        # Shared through the rate limits' Redis store, there when limits are on (auto-blocking here).
        config = {"security": {"ip_blacklist": {"enabled": False, "auto_block": {
            "enabled": True, "threshold": 1000, "duration": "1h"}}},
            "state": {"backend": "redis", "redis": {"url": redis.url, "timeout": "2s"}}}
        workers = service(json.loads(json.dumps(config)))
        single = daemon(json.loads(json.dumps(config)))
        # Made through the supervisor, published by one worker: refused by the other instance.
        assert security(workers, "block-ip", "127.0.0.2/31").returncode == 0
        wait_for(lambda: status_from(single) == "refused", timeout=10)
        assert security(workers, "unblock-ip", "127.0.0.2/31").returncode == 0
        wait_for(lambda: status_from(single) == 200, timeout=10)
        # Switched on by the other instance: the workers see it, the supervisor takes it for both.
        assert security(single, "emergency", "--enable").returncode == 0
        wait_for(lambda: security_json(workers, "status")["emergency"] is True, timeout=10)
        for conns in _on_each_worker(workers, "127.0.0.1").values():
            assert _get(conns[0], "/v1/models", "sk-ant-client") == 401
        # Switched off through the supervisor: the other instance follows.
        assert security(workers, "emergency", "--disable").returncode == 0
        wait_for(lambda: status_from(single, key="sk-ant-client") == 200, timeout=10)
        assert "emergency_mode enabled=True by=uid=" in workers.log() and "via=redis" in workers.log()
    finally:
        redis.stop()
