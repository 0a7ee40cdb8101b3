"""In memory: the notify protocol's messages, and the drain at shutdown on a fake clock."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.web.server import NOT_DONE_YET

from ccproxy.drain import CUT_GRACE, FIRST_REQUEST_GRACE, drain
from ccproxy.http.request import ProxyRequest
from ccproxy.notify import Notifier
from tests.support.hardening import Conn

GOOD = b"GET /v1/models HTTP/1.1\r\nHost: proxy\r\n\r\n"


# -- notify


def _receiver(address: str | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    return sock


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.send(READY=1) is False


def test_messages_are_one_datagram_of_assignments(tmp_path: Path) -> None:
    path = str(tmp_path / "n.sock")
    with _receiver(path) as sock:
        notifier = Notifier({"NOTIFY_SOCKET": path})
        notifier.ready("listening on\nhttps://x")
        assert sock.recv(4096).decode().split("\n")[:2] == ["READY=1", "STATUS=listening on https://x"]
        notifier.reloading("reloading")
        message = dict(line.split("=", 1) for line in sock.recv(4096).decode().split("\n"))
        assert message["RELOADING"] == "1" and int(message["MONOTONIC_USEC"]) > 0
        notifier.stopping("bye")
        assert sock.recv(4096) == b"STOPPING=1\nSTATUS=bye"


def test_abstract_socket_names_start_with_at() -> None:
    name = f"ccproxy-unit-{id(object())}"
    with _receiver(b"\0" + name.encode()) as sock:
        Notifier({"NOTIFY_SOCKET": "@" + name}).status("hello")
        assert sock.recv(4096) == b"STATUS=hello"


def test_a_manager_gone_is_logged_once_and_its_return_once(tmp_path: Path) -> None:
    lines: list[str] = []

    def observer(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "ccproxy.notify":
            lines.append(event["log_format"])

    path = str(tmp_path / "gone.sock")
    notifier = Notifier({"NOTIFY_SOCKET": path})
    globalLogPublisher.addObserver(observer)
    try:
        for _ in range(3):
            assert notifier.send(STATUS="x") is False
        with _receiver(path):
            assert notifier.send(STATUS="y") is True
            assert notifier.send(STATUS="z") is True
    finally:
        globalLogPublisher.removeObserver(observer)
    assert len(lines) == 2 and "failed" in lines[0] and "again" in lines[1]


# -- drain


class Held:
    """A resource that keeps every request open until the test finishes it."""

    def __init__(self) -> None:
        self.requests: list[ProxyRequest] = []

    def render(self, request: ProxyRequest) -> Any:
        self.requests.append(request)
        request.request_id = f"req_{len(self.requests)}"
        return NOT_DONE_YET


def _another(c: Conn, port: int) -> tuple[Any, StringTransport]:
    addr = IPv4Address("TCP", "127.0.0.1", port)
    channel = c.site.buildProtocol(addr)
    transport = StringTransport(peerAddress=addr)
    channel.makeConnection(transport)
    return channel, transport


def _answer(request: ProxyRequest) -> None:
    request.write(b"event: one\n\n")
    request.write(b"event: last\n\n")
    request.finish()


def test_drain_closes_idle_connections_finishes_busy_ones_and_closes_new_requests() -> None:
    held = Held()
    busy = Conn(resource=held).send(GOOD)
    _, idle = _another(busy, 40001)
    kept_channel, kept = _another(busy, 40002)
    kept_channel.dataReceived(GOOD)
    _answer(held.requests[1])  # a finished request: the connection is kept alive, idle
    assert not kept.disconnecting
    kept.clear()
    late_channel, late = _another(busy, 40003)
    late_channel.dataReceived(GOOD[:10])  # a request head on its way

    first_channel, first = _another(busy, 40004)  # a new connection whose first request is on the way

    done = defer.ensureDeferred(drain(busy.site, busy.clock, 30.0))
    assert kept.disconnecting  # kept alive with nothing under way: closed at once
    assert not busy.transport.disconnecting and not late.disconnecting
    # Connections that carried no request yet get a moment to send their first: served, not dropped.
    assert not idle.disconnecting and not first.disconnecting
    first_channel.dataReceived(GOOD)
    _answer(held.requests[-1])
    assert b"connection: close" in first.value().lower() and first.disconnecting
    busy.clock.advance(FIRST_REQUEST_GRACE + 0.1)
    assert idle.disconnecting  # its first request never came

    # A request completed now on an open connection is served, with Connection: close.
    late_channel.dataReceived(GOOD[10:])
    _answer(held.requests[3])
    assert b"connection: close" in late.value().lower() and late.disconnecting

    busy.clock.advance(5)
    assert not done.called  # the first request is still under way
    _answer(held.requests[0])
    assert busy.transport.disconnecting  # closed after its response, not kept alive
    assert b"connection: close" not in busy.output.lower()  # its head had gone out before the drain
    busy.channel.connectionLost()
    late_channel.connectionLost()
    first_channel.connectionLost()
    busy.clock.advance(0.1)
    assert done.called and done.result == (1, 0)


def test_drain_cuts_what_overstays_and_records_each_cut(seen_events: list[dict[str, Any]]) -> None:
    held = Held()
    c = Conn(resource=held).send(GOOD)
    held.requests[0].write(b"event: one\n\n")
    aborted: list[bool] = []
    c.transport.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
    done = defer.ensureDeferred(drain(c.site, c.clock, 5.0))
    c.clock.advance(4.9)
    assert not aborted
    c.clock.advance(0.2)
    assert aborted == [True]
    cut = [e for e in seen_events if e.get("ccproxy_event") == "request_timeout"]
    assert cut[0]["reason"] == "drain_timeout" and cut[0]["request_id"] == "req_1"
    c.channel.connectionLost()
    c.clock.advance(0.1)
    assert done.result == (0, 1)


@pytest.mark.parametrize("timeout", [0.0, 1.0])
def test_drain_with_nothing_under_way_ends_at_once(timeout: float) -> None:
    held = Held()
    c = Conn(resource=held).send(GOOD)
    _answer(held.requests[0])  # kept alive, idle
    assert not c.closed
    done = defer.ensureDeferred(drain(c.site, c.clock, timeout))
    assert c.closed
    c.channel.connectionLost()
    c.clock.advance(0.1)
    assert done.result == (0, 0)


@pytest.mark.parametrize(("timeout", "waited"), [(30.0, FIRST_REQUEST_GRACE), (1.0, 1.0)])
def test_drain_waits_a_moment_for_a_new_connections_first_request(timeout: float, waited: float) -> None:
    c = Conn(resource=Held())  # accepted, its request not there yet
    done = defer.ensureDeferred(drain(c.site, c.clock, timeout))
    c.clock.advance(waited - 0.1)
    assert not c.closed and not done.called
    c.clock.advance(0.2)
    assert c.closed  # closed as idle, not aborted: it never sent a request
    c.channel.connectionLost()
    c.clock.advance(0.1)
    assert done.result == (0, 0)


def test_drain_waits_for_a_connection_its_gate_has_not_yet_started() -> None:
    # Built by the site but not yet started (a worker's gate asks the supervisor first): no phase,
    # no transport; the drain gives it the same moment, then ends without touching it.
    c = Conn(resource=Held())
    c.channel.connectionLost()
    waiting = c.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40005))
    done = defer.ensureDeferred(drain(c.site, c.clock, 30.0))
    c.clock.advance(FIRST_REQUEST_GRACE - 0.1)
    assert not done.called
    c.clock.advance(0.2 + CUT_GRACE)
    assert done.result == (0, 0) and waiting in c.site.channels


# -- shipped examples


def test_example_writes_the_shipped_files_and_keeps_an_existing_one(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from ccproxy.cli import main
    from tests.support.daemon import ROOT

    target = tmp_path / "config.yaml"
    assert main(["example", "config", "-o", str(target)]) == 0
    assert target.read_bytes() == (ROOT / "etc/ccproxy/config.yaml").read_bytes()
    target.write_text("mine")
    assert main(["example", "config", "-o", str(target)]) == 1
    assert target.read_text() == "mine" and "--force" in capsys.readouterr().err
    assert main(["example", "unit", "-o", str(target), "--force"]) == 0
    assert target.read_bytes() == (ROOT / "systemd/ccproxy.service").read_bytes()


def test_example_prints_to_stdout_and_makes_the_install_script_executable(
        tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    from ccproxy.cli import main
    from tests.support.daemon import ROOT

    assert main(["example", "unit"]) == 0
    assert capsysbinary.readouterr().out == (ROOT / "systemd/ccproxy.service").read_bytes()
    script = tmp_path / "install.sh"
    assert main(["example", "install-script", "-o", str(script)]) == 0
    assert script.stat().st_mode & 0o777 == 0o755 and script.read_bytes() == (ROOT / "packaging/install.sh").read_bytes()
    assert capsysbinary.readouterr().out == f"wrote {script}\n".encode()
    config = tmp_path / "config.yaml"
    assert main(["example", "config", "-o", str(config)]) == 0
    assert config.stat().st_mode & 0o777 == 0o644


def test_example_says_why_it_cannot_write_or_find_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from ccproxy import examples
    from ccproxy.cli import main

    assert main(["example", "config", "-o", str(tmp_path / "no-such-dir" / "config.yaml")]) == 1
    assert capsys.readouterr().err == (f"ccproxy example: cannot write {tmp_path}/no-such-dir/config.yaml: "
                                       "No such file or directory\n")
    assert not (tmp_path / "no-such-dir").exists()
    # A package installed without its data files: where it looked, and no traceback.
    monkeypatch.setitem(examples.EXAMPLES, "config", ("absent.yaml", "etc/ccproxy/absent.yaml"))
    assert main(["example", "config"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ccproxy example: the example config is not installed (looked in ")
    assert "etc/ccproxy/absent.yaml" in err and "share/ccproxy/absent.yaml" in err


def test_the_sdist_carries_what_the_tests_need(tmp_path: Path) -> None:
    """Build the sdist from the tracked files, unpack it, and run tests from the unpacked tree."""
    import shutil
    import subprocess
    import sys
    import tarfile

    from tests.support.daemon import ROOT

    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    if not tracked:
        pytest.skip("not a git checkout (an unpacked sdist, say): nothing to compare with")
    tree = tmp_path / "tree"
    for name in tracked.decode().split("\0"):
        if name and (ROOT / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tree / name)
    built = subprocess.run([sys.executable, "-c", "from setuptools import build_meta as b; print(b.build_sdist('dist'))"],
                           cwd=tree, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    with tarfile.open(tree / "dist" / built.stdout.split()[-1]) as tar:
        tar.extractall(tmp_path / "sdist", filter="data")
    unpacked = next((tmp_path / "sdist").iterdir())
    for needed in ("tests/conftest.py", "tests/support/daemon.py", "etc/ccproxy/config.yaml", "systemd/ccproxy.service",
                   "docs/operations.md", "packaging/install.sh", "twisted/plugins/ccproxy_plugin.py", ".ci/run"):
        assert (unpacked / needed).is_file(), needed
    # The unpacked copy's code is not the tree's: kept out of the suite's coverage measurement.
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVERAGE_")}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_ops.py",
                          "-k", "not sdist", "tests/test_e2e_smoke.py"], cwd=unpacked, capture_output=True, text=True,
                         timeout=300, env=env)
    assert run.returncode == 0, run.stdout[-3000:]


# -- dependency audit


def _fake_pip_audit(tmp: Path, report: dict[str, Any] | None) -> dict[str, str]:
    """A stand-in for pip-audit's command line at the boundary: writes the given JSON report."""
    import json
    import os

    package = tmp / "fake" / "pip_audit"
    package.mkdir(parents=True)
    body = ("import sys\nargs = sys.argv\nout = args[args.index('--output') + 1]\n"
            f"report = {json.dumps(report)!r}\n"
            "if report == 'null':\n    print('connection refused', file=sys.stderr); sys.exit(1)\n"
            "open(out, 'w').write(report)\nsys.exit(0)\n")
    (package / "__main__.py").write_text(body)
    (package / "__init__.py").write_text("")
    return {**os.environ, "PYTHONPATH": str(tmp / "fake")}


@pytest.mark.parametrize("report, code, said", [
    ({"dependencies": [{"name": "pyyaml", "version": "5.3", "vulns": [
        {"id": "PYSEC-2021-142", "fix_versions": ["5.4"]}]}]}, 1, "PYSEC-2021-142 (fixed in: 5.4)"),
    ({"dependencies": [{"name": "attrs", "version": "26.1.0", "vulns": []}]}, 0, "1 package(s) audited, 0"),
    ({"dependencies": [{"name": "attrs", "version": "26.1.0", "skip_reason": "not found"}]}, 0,
     "could not be audited"),
    (None, 0, "could not be had"),
])
def test_dependency_audit_fails_only_on_a_known_vulnerability(tmp_path: Path, report: Any, code: int,
                                                              said: str) -> None:
    import subprocess
    import sys

    from tests.support.daemon import ROOT

    env = _fake_pip_audit(tmp_path, report)
    run = subprocess.run([sys.executable, str(ROOT / "packaging" / "audit_deps.py")], env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == code, run
    assert said in run.stdout + run.stderr


def test_the_lock_pins_every_runtime_dependency_within_its_range() -> None:
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    from tests.support.daemon import ROOT

    pins = {}
    for line in (ROOT / "packaging/requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for spec in map(Requirement, declared):
        name = canonicalize_name(spec.name)
        assert name in pins, f"{spec.name} is not in packaging/requirements.lock: run python packaging/lock.py"
        assert spec.specifier.contains(pins[name], prereleases=True), (spec, pins[name])
