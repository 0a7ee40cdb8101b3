"""systemd's notify protocol across a zero-downtime restart, with the real daemon: a fake manager
that reads each datagram with the sender's pid and follows `NotifyAccess=main` as systemd does."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.conftest import Certs
from tests.support.daemon import Daemon
from tests.support.manager import FakeManager
from tests.support.upstream import FakeUpstream
from tests.support.workers import alive, request, terminate


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "two-workers"])
def test_a_restart_makes_the_successor_the_main_process_as_systemd_allows(
        tmp_path: Path, certs: Certs, upstream: FakeUpstream, workers: int) -> None:
    manager = FakeManager(str(tmp_path / "notify.sock"))
    config: dict[str, object] = {
        "server": {"tls": certs.tls(), "workers": workers},
        "upstreams": {name: {"base_url": upstream.url} for name in ("anthropic", "openai")},
    }
    if workers > 1:
        config["admin"] = {"enabled": False}
    d = Daemon(tmp_path, config, ca_file=certs.ca_file)
    d.env["NOTIFY_SOCKET"] = manager.path
    successor = 0
    try:
        d.start()
        assert d.proc is not None
        first = manager.main = d.proc.pid  # what systemd forked is its main process
        ready = manager.until("READY")
        assert ready.pid == first and "MAINPID" not in ready.fields
        d.proc.send_signal(signal.SIGUSR2)
        named = manager.until("MAINPID")
        successor = int(named.fields["MAINPID"])
        assert named.pid == first and successor != first and alive(successor)
        assert f"started successor pid {successor}" in d.log()
        assert d.proc.wait(60) == 0  # the old process drains and exits
        manager.drain()
        # systemd now follows the successor: `systemctl reload` (kill -HUP $MAINPID) reaches it,
        # and what it says is acted on.
        assert manager.main == successor
        os.kill(manager.main, signal.SIGHUP)
        assert manager.until("RELOADING").pid == successor
        assert manager.until("READY").pid == successor
        assert request(d, "/v1/models")[0] == 200
        terminate(successor, timeout=40)
        stopping = manager.until("STOPPING")
        assert stopping.pid == successor
        messages = manager.messages
        at = messages.index(named)
        # In order: the first process's READY and its naming of the successor are acted on; after
        # that it says nothing (its own STOPPING would read as the service stopping).
        accepted = [m for m in messages if m.accepted]
        assert accepted[0] is ready and accepted[1] is named
        assert all(m.pid == successor for m in accepted[2:])
        assert all(m.pid != first for m in messages[at + 1:])
        # No other process speaks for the service (workers are started without NOTIFY_SOCKET).
        assert {m.pid for m in messages} == {first, successor}
    finally:
        manager.close()
        if successor:
            terminate(successor)
        d.stop()
