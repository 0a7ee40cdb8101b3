"""`ccproxy security ...` against a stand-in admin socket: where it finds the socket, what it prints for
each answer, and one line on standard error with exit status 1 for every way of not reaching the daemon."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ccproxy.admin import cli
from ccproxy.cli import main
from ccproxy.config.admin import DEFAULT_SOCKET


class AdminStandIn:
    """A Unix socket that reads one request line per connection and sends `reply` (None: never answers)."""

    def __init__(self, path: Path, reply: bytes | None) -> None:
        self.path = path
        self.reply = reply
        self.requests: list[dict[str, Any]] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(4)
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            data = b""
            while not data.endswith(b"\n"):
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            self.requests.append(json.loads(data))
            if self.reply is None:
                self.held.append(conn)  # read, never answered
                continue
            conn.sendall(self.reply)
            conn.close()

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() of the thread (close alone does not)
        self.sock.close()
        for conn in self.held:
            conn.close()
        self.thread.join(5)


@pytest.fixture
def stand_in(tmp_path: Path) -> Iterator[Any]:
    made: list[AdminStandIn] = []

    def make(reply: Any, name: str = "admin.sock") -> AdminStandIn:
        raw = reply if isinstance(reply, bytes | None) else json.dumps(reply).encode()
        made.append(AdminStandIn(tmp_path / name, raw))
        return made[-1]

    yield make
    for s in made:
        s.close()


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["security", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_each_command_sends_its_request_and_prints_the_answer(stand_in: Any, capsys: pytest.CaptureFixture[str]) -> None:
    s = stand_in({"ok": True, "result": {"target": "192.0.2.0/24", "until": 0, "reason": "scan"}})
    assert _run(capsys, "--socket", str(s.path), "block-ip", "192.0.2.0/24", "--duration", "1h",
                "--reason", "scan") == (0, "blocked 192.0.2.0/24 until 1970-01-01T00:00:00Z (scan)\n", "")
    assert s.requests == [{"command": "block-ip",
                           "args": {"target": "192.0.2.0/24", "duration": "1h", "reason": "scan"}}]
    s.reply = json.dumps({"ok": True, "result": {"target": "192.0.2.0/24", "until": None, "reason": "scan"}}).encode()
    assert _run(capsys, "--socket", str(s.path), "--json", "block-ip", "192.0.2.0/24")[1] == (
        '{\n "reason": "scan",\n "target": "192.0.2.0/24",\n "until": null\n}\n')


def test_list_status_emergency_and_key_answers_are_shown_for_people(
        stand_in: Any, capsys: pytest.CaptureFixture[str]) -> None:
    s = stand_in({"ok": True, "result": {"blocks": []}})
    at = str(s.path)
    assert _run(capsys, "--socket", at, "list-blocks")[1] == "no addresses are blocked\n"
    s.reply = json.dumps({"ok": True, "result": {"blocks": [
        {"target": "192.0.2.9", "until": 86400, "by": "operator", "reason": "abuse"},
        {"target": "2001:db8::/32", "until": None, "by": "rule guessing", "reason": "auth"}]}}).encode()
    lines = _run(capsys, "--socket", at, "list-blocks")[1].splitlines()
    assert lines[0].split() == ["TARGET", "UNTIL", "BY", "REASON"]
    assert lines[1].split() == ["192.0.2.9", "1970-01-02T00:00:00Z", "operator", "abuse"]
    assert lines[2].split() == ["2001:db8::/32", "never", "rule", "guessing", "auth"]
    s.reply = json.dumps({"ok": True, "result": {"emergency": True, "since": 60, "by": "operator"}}).encode()
    assert _run(capsys, "--socket", at, "emergency", "--enable")[1] == (
        "emergency mode is on since 1970-01-01T00:01:00Z (operator)\n")
    s.reply = json.dumps({"ok": True, "result": {"emergency": False, "since": None, "by": None}}).encode()
    assert _run(capsys, "--socket", at, "emergency", "--status")[1] == "emergency mode is off\n"
    _run(capsys, "--socket", at, "emergency", "--disable")
    assert [r["args"] for r in s.requests[-3:]] == [{"action": "enable"}, {"action": "status"}, {"action": "disable"}]
    s.reply = json.dumps({"ok": True, "result": {"version": "1.0", "connections": 3}}).encode()
    assert _run(capsys, "--socket", at, "status")[1] == "version: 1.0\nconnections: 3\n"
    s.reply = json.dumps({"ok": True, "result": {"key": "ccp_new", "key_id": "k1", "grace_until": 3600,
                                                  "overlay": "/var/lib/ccproxy/keys.yaml"}}).encode()
    out = _run(capsys, "--socket", at, "rotate-key", "--key-id", "k1", "--grace", "1h")[1]
    assert "key: ccp_new\n" in out and "valid until 1970-01-01T01:00:00Z" in out and "/var/lib/ccproxy/keys.yaml" in out
    assert s.requests[-1] == {"command": "rotate-key", "args": {"key_id": "k1", "grace": "1h"}}
    s.reply = json.dumps({"ok": True, "result": {"target": "192.0.2.9"}}).encode()
    assert _run(capsys, "--socket", at, "unblock-ip", "192.0.2.9")[1] == "unblocked 192.0.2.9\n"


def test_a_refusal_or_a_garbled_answer_is_one_line_and_status_1(
        stand_in: Any, capsys: pytest.CaptureFixture[str]) -> None:
    s = stand_in({"ok": False, "error": "no API key with id 'x'"})
    assert _run(capsys, "--socket", str(s.path), "rotate-key", "--key-id", "x") == (
        1, "", "ccproxy security rotate-key: no API key with id 'x'\n")
    s.reply = b"<html>"
    assert _run(capsys, "--socket", str(s.path), "status") == (
        1, "", f"ccproxy security status: the daemon at {s.path} gave no answer\n")
    s.reply = b'{"ok": false}'
    assert _run(capsys, "--socket", str(s.path), "status")[2] == "ccproxy security status: refused\n"
    s.reply = b"{}"
    assert _run(capsys, "--socket", str(s.path), "status")[2] == "ccproxy security status: refused\n"
    for not_an_object in (b"[1]", b'"ok"', b"null"):
        s.reply = not_an_object
        assert _run(capsys, "--socket", str(s.path), "status") == (
            1, "", f"ccproxy security status: the daemon at {s.path} gave no answer\n"), not_an_object


def test_no_daemon_behind_the_socket(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "none.sock"
    assert _run(capsys, "--socket", str(missing), "status") == (
        1, "", f"ccproxy security status: no admin socket at {missing}: is ccproxy running with this config?\n")
    stale = tmp_path / "stale.sock"  # left behind by a daemon that died: nobody listens
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(stale))
    assert _run(capsys, "--socket", str(stale), "status")[2] == (
        f"ccproxy security status: cannot reach the daemon at {stale}: Connection refused\n")


def test_a_daemon_that_never_answers_is_given_up_on(stand_in: Any, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli, "TIMEOUT", 0.3)
    s = stand_in(None)
    assert _run(capsys, "--socket", str(s.path), "list-blocks") == (
        1, "", f"ccproxy security list-blocks: the daemon did not answer on {s.path} within 0.3s\n")


def test_the_socket_is_found_in_the_config(tmp_path: Path, stand_in: Any, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "etc").mkdir()
    s = stand_in({"ok": True, "result": {"blocks": []}}, name="a.sock")
    config = tmp_path / "etc" / "config.yaml"
    config.write_text("admin:\n  socket: ../a.sock\n")  # relative to the config's folder
    assert _run(capsys, "--config", str(config), "list-blocks") == (0, "no addresses are blocked\n", "")
    assert s.requests == [{"command": "list-blocks", "args": {}}]
    # Without a usable admin.socket key, the packaged default.
    for text in ("admin: {}\n", "server: {}\n", "[]\n", "admin:\n  socket: ''\n"):
        config.write_text(text)
        assert cli.socket_path(_ns(config)) == DEFAULT_SOCKET, text


def _ns(config: Path) -> Any:
    from types import SimpleNamespace

    return SimpleNamespace(socket=None, config=str(config))


def test_a_config_that_cannot_give_the_socket_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.yaml"
    assert _run(capsys, "--config", str(config), "status")[2] == (
        f"ccproxy security status: cannot read {config}: No such file or directory (give --socket PATH)\n")
    config.write_text("admin: [unclosed\n")
    assert _run(capsys, "--config", str(config), "status")[2] == (
        f"ccproxy security status: {config} is not valid YAML (give --socket PATH)\n")
    config.write_text("admin:\n  enabled: false\n")
    assert _run(capsys, "--config", str(config), "status") == (
        1, "", f"ccproxy security status: the admin socket is switched off in {config} (admin.enabled: false)\n")


def test_bad_arguments_are_refused_before_anything_is_sent(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["security", "emergency"], ["security", "rotate-key"], ["security", "--config", "a", "--socket", "b",
                                                                        "status"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        assert "error:" in capsys.readouterr().err
