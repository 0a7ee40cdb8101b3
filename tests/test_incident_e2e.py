"""`ccproxy security ...` against the real daemon: blocks, emergency mode and key rotation, each
across a restart. Clients that get blocked connect from 127.0.0.2, so the harness (127.0.0.1) keeps
its view of /ready."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.support.admin import security, security_json
from tests.support.authkit import UPSTREAM_KEYS
from tests.support.daemon import ROOT, Daemon

MESSAGE = {"model": "claude-sonnet-4-6", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
BLOCKED_SOURCE = "127.0.0.2"


def connect(d: Daemon, source: str = BLOCKED_SOURCE) -> http.client.HTTPSConnection:
    conn = http.client.HTTPSConnection(d.host, d.port, context=d.ssl_context(), timeout=5,
                                       source_address=(source, 0))
    conn.connect()
    return conn


def post(conn: http.client.HTTPConnection, key: str | None = None) -> tuple[int, dict[str, Any]]:
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["x-api-key"] = key
    conn.request("POST", "/v1/messages", body=json.dumps(MESSAGE), headers=headers)
    response = conn.getresponse()
    return response.status, json.loads(response.read() or b"{}")


def status_from(d: Daemon, key: str | None = None, source: str = BLOCKED_SOURCE) -> int | str:
    """The status of one request on a new connection, or "refused" when the connection is closed
    before any answer."""
    try:
        conn = connect(d, source)
        try:
            return post(conn, key)[0]
        finally:
            conn.close()
    except (ConnectionError, ssl.SSLError, http.client.RemoteDisconnected, OSError):
        return "refused"


def wait_for(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def assert_closed(conn: http.client.HTTPConnection, within: float = 10.0) -> None:
    """The daemon closes `conn` (a blocked client's kept-alive connection) within `within` seconds."""
    started = time.monotonic()
    with pytest.raises((ConnectionError, http.client.RemoteDisconnected, ssl.SSLError, OSError)):
        while True:
            post(conn)
            assert time.monotonic() - started < within, "the blocked client's connection stayed open"


def restart(d: Daemon) -> Daemon:
    d.stop()
    return d.start()


def test_admin_socket_is_private_and_status_answers(daemon: Any) -> None:
    d = daemon()
    mode = os.stat(d.admin_socket).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    status = security_json(d, "status")
    assert status["ready"] is True and status["emergency"] is False
    assert status["pid"] == d.proc.pid and status["connections"] >= 0
    digest = status["config_sha256"]
    assert len(digest) == 64 and status["uptime_seconds"] >= 0
    # --socket works as well as --config; a missing socket is one clear line and exit 1.
    assert security(d, "status", socket=d.admin_socket).returncode == 0
    missing = security(d, "status", socket=str(d.tmp / "nothing.sock"))
    assert missing.returncode == 1
    assert missing.stderr.count("\n") == 1 and "no admin socket" in missing.stderr
    assert "admin_command command=status by=uid=" in d.log()


def test_block_by_command_closes_connections_survives_restart_and_unblocks(daemon: Any) -> None:
    d = daemon()
    kept = connect(d)
    assert post(kept)[0] == 200
    done = security(d, "block-ip", BLOCKED_SOURCE, "--duration", "1h", "--reason", "key guessing")
    assert done.returncode == 0, done.stderr
    assert f"blocked {BLOCKED_SOURCE} until" in done.stdout
    # The kept-alive connection is closed, and a new one is refused at accept, within a second.
    assert_closed(kept)
    wait_for(lambda: status_from(d) == "refused", 1.0)
    assert status_from(d, source="127.0.0.1") == 200  # others are served
    # A range too, and the list shows both with who made them.
    assert security(d, "block-ip", "10.9.0.0/16").returncode == 0
    blocks = {b["target"]: b for b in security_json(d, "list-blocks")["blocks"]}
    assert set(blocks) == {BLOCKED_SOURCE, "10.9.0.0/16"}
    assert blocks[BLOCKED_SOURCE]["reason"] == "key guessing"
    assert blocks[BLOCKED_SOURCE]["by"].startswith(f"uid={os.geteuid()} pid=")
    assert blocks["10.9.0.0/16"]["until"] is None

    restart(d)
    assert status_from(d) == "refused"
    assert {b["target"] for b in security_json(d, "list-blocks")["blocks"]} == {BLOCKED_SOURCE, "10.9.0.0/16"}
    done = security(d, "unblock-ip", BLOCKED_SOURCE)
    assert done.returncode == 0 and f"unblocked {BLOCKED_SOURCE}" in done.stdout
    wait_for(lambda: status_from(d) == 200, 1.0)
    again = security(d, "unblock-ip", BLOCKED_SOURCE)
    assert again.returncode == 1 and "is not blocked" in again.stderr
    bad = security(d, "block-ip", "not-an-address")
    assert bad.returncode == 1 and "not an IP address" in bad.stderr
    log = d.log()
    assert "ip_blocked ip_address=127.0.0.2 reason=key guessing by=uid=" in log
    assert "ip_unblocked ip_address=127.0.0.2 reason=unblocked by command by=uid=" in log


def test_emergency_mode_on_and_off_across_restart(daemon: Any) -> None:
    # Auth off: client credentials pass through. Emergency mode's default profile requires a
    # ccproxy credential, so nothing is served while it is on.
    d = daemon()
    assert status_from(d, key="sk-ant-client") == 200
    on = security(d, "emergency", "--enable")
    assert on.returncode == 0 and "emergency mode is on since" in on.stdout
    wait_for(lambda: status_from(d, key="sk-ant-client") == 401, 1.0)
    assert json.loads(d.get("/ready").read()) == {"status": "ready", "emergency": True}
    restart(d)
    assert status_from(d, key="sk-ant-client") == 401
    assert security_json(d, "emergency", "--status")["emergency"] is True
    assert security_json(d, "status")["emergency"] is True
    off = security(d, "emergency", "--disable")
    assert off.returncode == 0 and "emergency mode is off" in off.stdout
    wait_for(lambda: status_from(d, key="sk-ant-client") == 200, 1.0)
    assert json.loads(d.get("/ready").read()) == {"status": "ready"}
    log = d.log()
    assert "emergency_mode enabled=True by=uid=" in log and "emergency_mode enabled=False by=uid=" in log
    assert "reason=emergency_auth_required" in log


def test_emergency_profile_serves_only_listed_keys(daemon: Any) -> None:
    keys = {"ops": "ccp_incident-ops-key-000000000000001", "app": "ccp_incident-app-key-000000000000002"}
    d = daemon({
        "upstreams": {name: {"api_key": key} for name, key in UPSTREAM_KEYS.items()},
        "security": {
            "auth": {"enabled": True, "api_keys": [
                {"id": kid, "key_sha256": hashlib.sha256(k.encode()).hexdigest()} for kid, k in keys.items()
            ]},
            "emergency": {"allowed_keys": ["ops"]},
        },
    })
    assert status_from(d, key=keys["app"]) == 200
    assert security(d, "emergency", "--enable").returncode == 0
    assert status_from(d, key=keys["app"]) == 403
    assert status_from(d, key=keys["ops"]) == 200
    assert security(d, "emergency", "--disable").returncode == 0
    assert status_from(d, key=keys["app"]) == 200


def test_rotated_key_works_at_once_old_one_refused_after_grace_across_restart(daemon: Any) -> None:
    old = "ccp_incident-old-key-0000000000000000a"
    d = daemon({
        "upstreams": {name: {"api_key": key} for name, key in UPSTREAM_KEYS.items()},
        "security": {"auth": {"enabled": True, "api_keys": [
            {"id": "team-a", "tier": "premium", "key_sha256": hashlib.sha256(old.encode()).hexdigest()},
        ]}},
    })
    done = security(d, "rotate-key", "--key-id", "team-a", "--grace", "10s")
    assert done.returncode == 0, done.stderr
    new = next(line.split(": ", 1)[1] for line in done.stdout.splitlines() if line.startswith("key: "))
    assert new.startswith("ccp_") and new != old
    rotated_at = time.monotonic()
    assert status_from(d, key=new) == 200
    assert status_from(d, key=old) == 200  # within its grace
    # Only the digest is stored; the key is nowhere on disk or in the log.
    overlay = (d.tmp / "state" / "rotated-keys.json").read_text()
    assert hashlib.sha256(new.encode()).hexdigest() in overlay and new not in overlay
    assert new not in d.log()
    # check-config shows the overlay: the rotated key, and the old one's end of grace, as comments.
    shown = subprocess.run([sys.executable, "-m", "ccproxy.cli", "check-config", str(d.config_path)],
                           cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                           text=True, timeout=30)
    assert shown.returncode == 0, shown.stderr
    assert "# with the rotated-keys overlay " in shown.stdout
    assert "# rotated key of 'team-a' (key_sha256 …" in shown.stdout and "the 1 before it valid until" in shown.stdout
    restart(d)
    assert status_from(d, key=new) == 200
    wait_for(lambda: time.monotonic() - rotated_at > 10.5, 20.0)
    assert status_from(d, key=old) == 401
    assert status_from(d, key=new) == 200
    log = d.log()
    assert "api_key_rotation api_key_id=team-a by=uid=" in log
    assert "reason=expired_api_key" in log
    refused = security(d, "rotate-key", "--key-id", "nobody")
    assert refused.returncode == 1 and "no API key with id 'nobody'" in refused.stderr


def test_blocks_and_emergency_reach_every_instance_sharing_redis(daemon: Any, tmp_path: Any) -> None:
    from tests.support.redis import RedisServer

    redis = RedisServer(tmp_path).start()
    try:
        state = {"backend": "redis", "redis": {"url": redis.url, "timeout": "2s"}}
        config = {"security": {"ip_blacklist": {"enabled": False, "auto_block": {
            "enabled": True, "threshold": 40, "duration": "1h"}}}, "state": state}
        first, second = daemon(json.loads(json.dumps(config))), daemon(json.loads(json.dumps(config)))
        assert security(first, "block-ip", "127.0.0.2/31").returncode == 0
        wait_for(lambda: status_from(second) == "refused", 5.0)
        assert security(second, "unblock-ip", "127.0.0.2/31").returncode == 0
        wait_for(lambda: status_from(first) == 200 and status_from(second) == 200, 5.0)
        # Lifted everywhere for good: the instance that made it no longer lists (or keeps) it.
        assert security_json(first, "list-blocks")["blocks"] == []
        # An automatic block lifted by command stays lifted (Redis forgets it too), on both.
        # Both instances count the address's requests in Redis, the polls above included: over 40
        # in a minute, the request that crosses blocks it (and the block closes this connection).
        conn = connect(first)
        with contextlib.suppress(ConnectionError, http.client.HTTPException, OSError):
            for _ in range(41):
                if post(conn)[0] == 429:
                    break
        conn.close()
        wait_for(lambda: status_from(first) == "refused" and status_from(second) == "refused", 5.0)
        assert security(first, "unblock-ip", BLOCKED_SOURCE).returncode == 0
        wait_for(lambda: status_from(second) == 200, 5.0)
        assert status_from(first) == 200
        # The emergency switch too: on by one instance, off by the other.
        assert security(first, "emergency", "--enable").returncode == 0
        wait_for(lambda: status_from(second, key="sk-ant-client") == 401, 5.0)
        assert security_json(second, "status")["emergency"] is True
        assert security(second, "emergency", "--disable").returncode == 0
        wait_for(lambda: status_from(first, key="sk-ant-client") == 200, 5.0)
        assert "emergency_mode enabled=False by=uid=" in first.log() and "via=redis" in first.log()
    finally:
        redis.stop()


def _as_nobody(path: str) -> str:
    """Connect to the admin socket from a child process running as `nobody`; what it got back."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no exec (the interpreter is already here), just drop to nobody
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            import socket as sockets

            with sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM) as s:
                s.settimeout(5)
                s.connect(path)
                s.sendall(b'{"command": "status"}\n')
                answer = s.recv(65536)
            os.write(write, answer)
        except OSError as e:
            os.write(write, f"OSError {e.errno}".encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read, "rb") as f:
        return f.read().decode()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another user")
def test_only_root_and_the_daemon_user_are_served(daemon: Any) -> None:
    import errno
    import shutil
    import tempfile

    where = tempfile.mkdtemp(prefix="ccproxy-admin-")  # outside pytest's private tmp: others can reach it
    try:
        os.chmod(where, 0o755)
        d = daemon({"admin": {"socket": f"{where}/admin.sock"}})
        # The socket's mode keeps other users out...
        assert _as_nobody(f"{where}/admin.sock") == f"OSError {errno.EACCES}"
        # ...and were it opened up, the daemon itself refuses them, naming who tried.
        os.chmod(f"{where}/admin.sock", 0o666)
        answer = json.loads(_as_nobody(f"{where}/admin.sock"))
        assert answer == {"ok": False, "error": "not allowed: run as root or as the daemon's user"}
        assert "admin_command command=- by=uid=65534 pid=" in d.log()
        assert security(d, "status").returncode == 0  # root is served
    finally:
        shutil.rmtree(where, ignore_errors=True)
