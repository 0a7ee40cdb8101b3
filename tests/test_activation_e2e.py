"""Socket activation and zero-downtime restart, with the real daemon and real sockets."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from ccproxy.audit.verify import verify
from tests.conftest import Certs
from tests.support.daemon import Daemon, free_port
from tests.support.upstream import FakeUpstream, Script, message_json
from tests.support.workers import (
    Stream,
    activate,
    alive,
    listening_socket,
    log_match,
    request,
    terminate,
    wait_for,
)


def _config(certs: Certs, upstream: FakeUpstream, **server: object) -> dict[str, object]:
    return {
        "server": {"tls": certs.tls(), **server},
        "upstreams": {name: {"base_url": upstream.url} for name in ("anthropic", "openai")},
    }


def test_socket_activation_serves_on_the_passed_descriptor(tmp_path: Path, certs: Certs,
                                                           upstream: FakeUpstream) -> None:
    sock = listening_socket()
    # The config names another port: the socket systemd passes is the one served.
    d = Daemon(tmp_path, _config(certs, upstream, port=free_port()), ca_file=certs.ca_file)
    activate(d, sock)
    try:
        d.start()
        assert request(d, "/v1/models")[0] == 200
        assert upstream.requests[-1].path == "/v1/models"
        assert "(descriptor 3 passed by the parent process)" in d.log()
        assert "in the config is not used" in d.log()
    finally:
        d.stop()
        sock.close()


def test_activation_for_another_process_is_ignored(tmp_path: Path, certs: Certs, upstream: FakeUpstream) -> None:
    """LISTEN_PID names the process the sockets are for: a child that inherited the variables binds
    its own port instead of serving its parent's socket."""
    sock = listening_socket()
    d = Daemon(tmp_path, _config(certs, upstream), ca_file=certs.ca_file)
    d.pass_fds = (sock.fileno(),)
    d.env.update({"LISTEN_FDS": "1", "LISTEN_FDNAMES": "ccproxy", "LISTEN_PID": "1"})
    try:
        d.start()
        assert "(bound)" in d.log()
        assert request(d, "/ready")[0] == 200
    finally:
        d.stop()
        sock.close()


def test_restart_under_a_steady_stream_fails_no_request(tmp_path: Path, certs: Certs,
                                                        upstream: FakeUpstream) -> None:
    """SIGUSR2: a successor takes the socket over, the old process finishes what it had and exits;
    requests flowing all along, each on a new connection, see no failure and no refusal."""
    d = Daemon(tmp_path, _config(certs, upstream), ca_file=certs.ca_file)
    d.start()
    successor = 0
    try:
        # Some requests take a while upstream, so the old process has work in flight when it retires.
        slow = [Script(body=b'{"id":"slow"}', headers={"content-type": "application/json"}, delay=0.5)
                for _ in range(6)]
        with Stream(d, ["/v1/models", "/ready", "/v1/models"], threads=4) as stream:
            wait_for(lambda: stream.count() >= 20)
            upstream.expect(*slow)
            assert d.proc is not None
            d.proc.send_signal(signal.SIGUSR2)
            successor = int(wait_for(lambda: log_match(d, r"started successor pid (\d+)"))[0].group(1))
            d.proc.wait(60)  # the old process drains, then exits
            before = stream.count()
            wait_for(lambda: stream.count() >= before + 20)  # the successor serves alone
        assert d.proc.returncode == 0, d.log()
        assert stream.failures == [], stream.failures[:5]
        assert alive(successor)
        log = d.log()
        assert log.index("ready") < log.index("draining: successor pid")
        assert f"draining: successor pid {successor} serves on the listening socket" in log
        assert "drained; exiting" in log
        assert request(d, "/v1/models")[0] == 200
        assert sum(1 for r in upstream.requests if r.path == "/v1/models") >= 40
    finally:
        if successor:
            terminate(successor)
        d.stop()


def test_a_successor_that_fails_leaves_the_old_process_serving(tmp_path: Path, certs: Certs,
                                                               upstream: FakeUpstream) -> None:
    d = Daemon(tmp_path, _config(certs, upstream), ca_file=certs.ca_file)
    d.start()
    try:
        # The successor reads the file anew: make it unusable (the running config is unaffected).
        d.config_path.write_text("server: [unusable\n")
        assert d.proc is not None
        d.proc.send_signal(signal.SIGUSR2)
        wait_for(lambda: "restart failed: the successor exited before it was ready" in d.log())
        assert d.proc.poll() is None
        assert request(d, "/v1/models")[0] == 200
    finally:
        d.stop()


_ = message_json  # the default upstream reply shape, for readers of this module


def test_the_audit_chain_stays_one_across_a_restart(tmp_path: Path, certs: Certs, upstream: FakeUpstream) -> None:
    """The successor writes no record until its predecessor has exited, then carries on its chain."""
    audit_file, access_file = tmp_path / "audit.log", tmp_path / "access.log"
    config = _config(certs, upstream)
    config["security"] = {"audit": {"outputs": [
        {"type": "file", "path": str(audit_file), "flush_interval": "50ms"},
        {"type": "file", "path": str(access_file), "records": "access", "flush_interval": "50ms"},
    ]}}
    d = Daemon(tmp_path, config, ca_file=certs.ca_file)
    d.start()
    successor = 0
    try:
        slow = [Script(body=b'{"id":"slow"}', headers={"content-type": "application/json"}, delay=0.5)
                for _ in range(6)]
        with Stream(d, ["/v1/models"], threads=4) as stream:
            wait_for(lambda: stream.count() >= 20)
            upstream.expect(*slow)
            assert d.proc is not None
            d.proc.send_signal(signal.SIGUSR2)
            successor = int(wait_for(lambda: log_match(d, r"started successor pid (\d+)"))[0].group(1))
            d.proc.wait(60)
            before = stream.count()
            wait_for(lambda: stream.count() >= before + 20)
        assert stream.failures == []
        wait_for(lambda: "audit trail started" in d.log())
        # A reload in the successor makes one more security record, after the predecessor's.
        d.proc = None
        os.kill(successor, signal.SIGHUP)
        wait_for(lambda: d.log().count("config reloaded") >= 1)
    finally:
        if successor:
            terminate(successor)
        d.stop()
    access = [json.loads(line) for line in access_file.read_text().splitlines()]
    assert [r["seq"] for r in access] == list(range(1, len(access) + 1))
    served = [r for r in access if r["path"] == "/v1/models"]
    assert len(served) == sum(1 for r in upstream.requests if r.path == "/v1/models")
    assert verify([str(access_file)]).ok
    records = [json.loads(line) for line in audit_file.read_text().splitlines()]
    assert [r["event"] for r in records][-1] == "configuration_change"
    assert verify([str(audit_file)]).ok
