"""privacy.hipaa with the real daemon: files and spools encrypted at rest, syslog over TLS (RFC 5425) to
`openssl s_server`, access records for every request (refusals included), plaintext hops refused at
check-config and at reload."""

from __future__ import annotations

import os
import re
import shutil
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anthropic
import pytest

from ccproxy.audit.privacy import AtRest, KeyStore
from ccproxy.audit.privacy._keys import master_key
from tests.support.clients import _httpx
from tests.support.daemon import Daemon, free_port

MASTER = "hipaa-e2e-master-key-00000000000000000000000000"
CLIENT_KEY = "ccp-hipaa-client-key-0123456789abcdef"
ENV = {"CCPROXY_MASTER_KEY": MASTER}
UPSTREAM_KEY = "sk-ant-api03-HIPAAUPSTREAM00000000000000000000000000000000000000000f3a9"


class TLSReceiver:
    """`openssl s_server` as an RFC 5425 receiver: it prints what it gets."""

    def __init__(self, tmp: Path, cert: str, key: str) -> None:
        if shutil.which("openssl") is None:
            raise RuntimeError("openssl is required (Debian package openssl)")
        self.port = free_port()
        self.out = tmp / "tls-received.log"
        out = open(self.out, "wb")
        self.proc = subprocess.Popen(["openssl", "s_server", "-accept", f"127.0.0.1:{self.port}", "-cert", cert,
                                      "-key", key, "-quiet"], stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.PIPE)
        out.close()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def _config(tmp: Path, receiver: TLSReceiver, ca_file: str) -> dict[str, Any]:
    logs = tmp / "logs"
    return {
        "upstreams": {"anthropic": {"api_key": UPSTREAM_KEY}},
        "security": {
            "auth": {"enabled": True, "api_keys": [{"id": "key-h", "key": CLIENT_KEY, "user_id": "patient-portal",
                                                    "allowed_ips": ["127.0.0.1/32"]}]},
            "audit": {"outputs": [
                {"type": "file", "path": str(logs / "audit.log"), "flush_interval": "20ms"},
                {"type": "file", "path": str(logs / "access.log"), "records": "access", "flush_interval": "20ms"},
                {"type": "syslog", "protocol": "tcp", "host": "127.0.0.1", "port": receiver.port,
                 "spool_path": str(logs / "spool"), "tls": {"enabled": True, "ca_file": ca_file}}]},
        },
        "privacy": {"hipaa": {"enabled": True, "encryption_at_rest": True, "encryption_in_transit": True,
                              "access_controls": "strict", "audit_logs": "comprehensive"},
                    "keys": {"store": str(tmp / "keys"), "master_key": "${CCPROXY_MASTER_KEY}"}},
    }


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ccproxy.cli", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **ENV, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})


def _call(d: Daemon, key: str, source: str) -> int:
    ctx = ssl.create_default_context(cafile=d.ca_file)
    transport = _httpx.HTTPTransport(local_address=source, verify=ctx)
    client = anthropic.Anthropic(base_url=d.url, api_key=key, max_retries=0,
                                 http_client=_httpx.Client(transport=transport, timeout=30))
    try:
        client.messages.create(model="claude-sonnet-4-6", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    except anthropic.APIStatusError as e:
        return e.status_code
    return 200


def _wait(predicate: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def receiver(tmp_path: Path, certs: Any) -> Any:
    r = TLSReceiver(tmp_path, certs.cert_file, certs.key_file)
    yield r
    r.stop()


def test_hipaa_at_rest_in_transit_and_every_request_recorded(daemon: Any, receiver: TLSReceiver, certs: Any) -> None:
    d: Daemon = daemon({}, env=ENV)
    d.stop()
    config = _config(d.tmp, receiver, certs.ca_file)
    config["upstreams"]["anthropic"]["base_url"] = d.config["upstreams"]["anthropic"]["base_url"]
    d.config.update(config)
    d.write_config()
    checked = _cli("check-config", str(d.config_path))
    assert checked.returncode == 0, checked.stderr
    for name in ("encryption_at_rest", "encryption_in_transit", "access_controls: strict",
                 "audit_logs: comprehensive"):
        assert f"# privacy.hipaa.{name}: holds" in checked.stdout
    d.start()
    assert _call(d, CLIENT_KEY, "127.0.0.1") == 200
    assert _call(d, "ccp-a-wrong-key-000000000000", "127.0.0.1") == 401
    assert _call(d, CLIENT_KEY, "127.0.0.2") == 403  # the key's allowed_ips
    _wait(lambda: receiver.out.read_bytes().count(b"authentication_") >= 2)
    d.stop()
    logs = d.tmp / "logs"
    written = [p for p in logs.rglob("*") if p.is_file() and not p.name.endswith(".checkpoints")]
    assert {p.name for p in written} >= {"audit.log", "access.log"}
    for path in written:
        data = path.read_bytes()
        for probe in (b"authentication_success", b"authentication_failure", b"http_request", b"127.0.0.1",
                      b"127.0.0.2", b"key-h", b"patient-portal"):
            assert probe not in data, f"{path} holds {probe!r} in clear"
    # Every request has its access record, refusals included.
    store = KeyStore(str(d.tmp / "keys"), master_key(MASTER)).open()
    decode = AtRest(store.at_rest_key(create=False) or b"").decode
    access = [decode(line) for line in (logs / "access.log").read_bytes().splitlines()]
    assert sorted((r["status"], r["ip_address"]) for r in access if r["path"] == "/v1/messages") == [
        (200, "127.0.0.1"), (401, "127.0.0.1"), (403, "127.0.0.2")]
    # The records left the host over TLS, in RFC 5425 frames (octet counting).
    received = receiver.out.read_bytes()
    frame = re.match(rb"(\d+) (<\d+>1 .*)", received, re.DOTALL)
    assert frame is not None and b"authentication_success" in received
    length = int(frame.group(1))
    assert frame.group(2)[length:length + 1].isdigit()  # the next frame's length right after this one
    files = [str(p) for p in logs.glob("audit.log*")]
    ok = _cli("audit", "verify", "--config", str(d.config_path), *files)
    assert ok.returncode == 0, ok.stderr
    keyless = _cli("audit", "verify", *files)
    assert keyless.returncode == 1 and "encrypted at rest (privacy.hipaa.encryption_at_rest)" in keyless.stderr
    audit = logs / "audit.log"
    data = bytearray(audit.read_bytes())
    data[len(data) // 2] ^= 0x04
    audit.write_bytes(bytes(data))
    flipped = _cli("audit", "verify", "--config", str(d.config_path), *files)
    assert flipped.returncode == 1 and "cannot be decrypted: changed" in flipped.stderr, flipped.stderr


def test_a_plaintext_hop_is_refused_at_check_config_and_at_reload(daemon: Any, receiver: TLSReceiver,
                                                                   certs: Any) -> None:
    d: Daemon = daemon({}, env=ENV)
    d.stop()
    config = _config(d.tmp, receiver, certs.ca_file)
    config["upstreams"]["anthropic"]["base_url"] = d.config["upstreams"]["anthropic"]["base_url"]
    d.config.update(config)
    d.start()
    bad = dict(d.config)
    bad["upstreams"] = {"anthropic": {"api_key": UPSTREAM_KEY, "base_url": "http://api.example.com"}}
    answer = d.reload(bad)
    assert "config reload refused" in answer
    assert "upstreams.anthropic.base_url: http://api.example.com is plain http" in answer
    refused = _cli("check-config", str(d.config_path))
    assert refused.returncode == 1 and "privacy.hipaa.encryption_in_transit forbids it" in refused.stderr
    assert _call(d, CLIENT_KEY, "127.0.0.1") == 200  # the previous config still serves
