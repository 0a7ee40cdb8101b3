"""Shared fixtures: a fake upstream, test certificates, and the real daemon."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from twisted.logger import globalLogPublisher

from tests.support.daemon import Daemon
from tests.support.upstream import FakeUpstream


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    server = FakeUpstream()
    yield server
    server.close()


class Certs:
    def __init__(self, tmp: Path) -> None:
        self.ca = trustme.CA(key_type=trustme.KeyType.RSA)
        self.server = self.ca.issue_cert("localhost", "127.0.0.1", "::1", key_type=trustme.KeyType.RSA)
        self.ca_file = str(tmp / "ca.pem")
        self.cert_file = str(tmp / "cert.pem")
        self.key_file = str(tmp / "key.pem")
        self.ca.cert_pem.write_to_path(self.ca_file)
        self.server.private_key_pem.write_to_path(self.key_file)
        with open(self.cert_file, "wb") as f:
            for blob in self.server.cert_chain_pems:
                f.write(blob.bytes())

    def tls(self, **extra: Any) -> dict[str, Any]:
        return {"enabled": True, "cert_file": self.cert_file, "key_file": self.key_file, **extra}


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return Certs(tmp_path)


@pytest.fixture
def daemon(tmp_path: Path, certs: Certs, upstream: FakeUpstream) -> Iterator[Callable[..., Daemon]]:
    """`daemon(config)` starts ccproxy with TLS from `certs`, both upstreams pointed at the fake one."""
    started: list[Daemon] = []

    def start(config: dict[str, Any] | None = None, env: dict[str, str] | None = None, **tls: Any) -> Daemon:
        config = dict(config or {})
        server = config.setdefault("server", {})
        server.setdefault("tls", certs.tls(**tls))
        ups = config.setdefault("upstreams", {})
        for name in ("anthropic", "openai"):
            ups.setdefault(name, {}).setdefault("base_url", upstream.url)
        sub = tmp_path / f"d{len(started)}"
        sub.mkdir()
        d = Daemon(sub, config, env=env, ca_file=certs.ca_file)
        started.append(d)
        return d.start()

    yield start
    for d in started:
        d.stop()


@pytest.fixture
def seen_events() -> Iterator[list[dict[str, Any]]]:
    """The ccproxy security events logged while the test runs."""
    found: list[dict[str, Any]] = []

    def observer(event: dict[str, Any]) -> None:
        if event.get("ccproxy_event"):
            found.append(event)

    globalLogPublisher.addObserver(observer)
    yield found
    globalLogPublisher.removeObserver(observer)
