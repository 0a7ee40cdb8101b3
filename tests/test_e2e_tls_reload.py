"""TLS policy seen by real clients (openssl s_client, curl), SIGHUP reloads, the CLI and packaging."""

from __future__ import annotations

import copy
import http.client
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import trustme
import yaml

from tests.support.daemon import ROOT
from tests.support.upstream import FakeUpstream, Script, anthropic_stream


def s_client(d: Any, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", "s_client", "-connect", f"{d.host}:{d.port}", "-servername", "localhost", *args],
        input="", capture_output=True, text=True, timeout=20,
    )


def negotiated(result: subprocess.CompletedProcess[str]) -> bool:
    return result.returncode == 0 and re.search(r"Cipher is (?!\(NONE\))", result.stdout) is not None


def test_tls11_refused_even_to_a_willing_client(daemon) -> None:
    d = daemon()
    # SECLEVEL=0 makes the client itself willing to speak TLS 1.1: only the server can refuse.
    old = s_client(d, "-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0")
    assert not negotiated(old), old.stdout
    assert negotiated(s_client(d, "-tls1_2"))


def test_cipher_not_in_list_refused(daemon) -> None:
    d = daemon(cipher_suites=["TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384"])
    ok = s_client(d, "-tls1_2", "-cipher", "ECDHE-RSA-AES256-GCM-SHA384")
    assert negotiated(ok) and "ECDHE-RSA-AES256-GCM-SHA384" in ok.stdout
    refused = s_client(d, "-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256")
    assert not negotiated(refused)
    # The intermediate profile has no CBC suites, so a CBC-only client is refused too.
    assert not negotiated(s_client(d, "-tls1_2", "-cipher", "ECDHE-RSA-AES128-SHA"))


def test_default_profile_refuses_cbc_and_allows_tls13(daemon) -> None:
    d = daemon()
    assert not negotiated(s_client(d, "-tls1_2", "-cipher", "ECDHE-RSA-AES128-SHA256"))
    assert negotiated(s_client(d, "-tls1_2", "-cipher", "ECDHE-RSA-CHACHA20-POLY1305"))
    assert negotiated(s_client(d, "-tls1_3"))


def test_tls13_suites_restricted_when_listed(daemon) -> None:
    d = daemon(min_version="1.3", cipher_suites=["TLS_AES_256_GCM_SHA384"])
    assert negotiated(s_client(d, "-tls1_3", "-ciphersuites", "TLS_AES_256_GCM_SHA384"))
    assert not negotiated(s_client(d, "-tls1_3", "-ciphersuites", "TLS_CHACHA20_POLY1305_SHA256"))
    assert not negotiated(s_client(d, "-tls1_2"))


def test_curl_through_the_proxy(daemon, certs, upstream: FakeUpstream) -> None:
    d = daemon()
    out = subprocess.run(
        ["curl", "-sS", "--cacert", certs.ca_file, "-H", "x-api-key: k", "-H", "content-type: application/json",
         "-d", '{"model":"m","max_tokens":5,"messages":[]}', "-D", "-", f"https://localhost:{d.port}/v1/messages"],
        capture_output=True, text=True, timeout=20,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("HTTP/1.1 200")
    assert '"type": "message"' in out.stdout or '"type":"message"' in out.stdout


def _serial(d: Any, ca_file: str) -> int:
    ctx = ssl.create_default_context(cafile=ca_file)
    with socket.create_connection((d.host, d.port)) as raw, ctx.wrap_socket(raw, server_hostname="localhost") as s:
        cert = s.getpeercert()
        assert cert is not None
        return int(str(cert["serialNumber"]), 16)


def test_sighup_swaps_config_and_certificate_without_dropping_connections(
        daemon, certs, upstream: FakeUpstream, tmp_path: Path) -> None:
    d = daemon({"upstreams": {"anthropic": {"api_key": "sk-ant-first-key-000000000000000001"}}})
    before = _serial(d, certs.ca_file)

    # A stream that outlives the reload.
    upstream.expect(Script(events=anthropic_stream(["a"] * 30), headers={"content-type": "text/event-stream"},
                           event_gap=0.05))
    conn = http.client.HTTPSConnection(d.host, d.port, context=d.ssl_context(), timeout=20)
    conn.request("POST", "/v1/messages", body=b"{}")
    streaming = conn.getresponse()
    first = streaming.read(50)

    new_cert = certs.ca.issue_cert("localhost", "127.0.0.1", key_type=trustme.KeyType.RSA)
    new_cert.private_key_pem.write_to_path(certs.key_file)
    with open(certs.cert_file, "wb") as f:
        for blob in new_cert.cert_chain_pems:
            f.write(blob.bytes())
    config = yaml.safe_load(d.config_path.read_text())
    config["upstreams"]["anthropic"]["api_key"] = "sk-ant-second-key-00000000000000002"
    line = d.reload(config)
    assert "config reloaded" in line and "upstreams.anthropic.api_key" in line
    assert "sk-ant-second" not in d.log()

    rest = streaming.read()  # the old connection kept flowing to the end
    assert first and rest.rstrip().endswith(b'"message_stop"}')
    conn.close()

    assert _serial(d, certs.ca_file) != before
    conn = http.client.HTTPSConnection(d.host, d.port, context=d.ssl_context(), timeout=20)
    conn.request("GET", "/v1/models")
    assert conn.getresponse().status == 200
    assert upstream.requests[-1].header("x-api-key") == "sk-ant-second-key-00000000000000002"


def test_invalid_reload_refused_old_config_keeps_serving(daemon, upstream: FakeUpstream) -> None:
    d = daemon({"upstreams": {"anthropic": {"api_key": "sk-ant-kept-key-0000000000000000003"}}})
    original = copy.deepcopy(d.config)
    line = d.reload("server:\n  port: [not a port\n")
    assert "config reload refused" in line and "not valid YAML" in line
    line = d.reload({**original, "security": {"rate_limting": {}}})
    assert "security.rate_limting: unknown key (did you mean rate_limiting?)" in line
    line = d.reload({**original, "server": {**original["server"], "port": d.port + 1}})
    assert "server.port: cannot change on reload" in line
    assert d.get("/health").status == 200
    conn = http.client.HTTPSConnection(d.host, d.port, context=d.ssl_context(), timeout=20)
    conn.request("GET", "/v1/models")
    assert conn.getresponse().status == 200
    assert upstream.requests[-1].header("x-api-key") == "sk-ant-kept-key-0000000000000000003"


def test_bad_config_at_start_is_a_clear_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("server:\n  tls:\n    enabled: false\n  prot: 1\n")
    out = subprocess.run([sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; run()",
                          "-n", "--pidfile=", "ccproxy", "--config", str(path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=30,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode != 0
    assert "server.prot: unknown key (did you mean port?)" in out.stderr + out.stdout
    assert "Traceback" not in out.stderr + out.stdout


def test_check_config_cli(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("server:\n  tls:\n    enabled: false\nupstreams:\n  anthropic:\n    api_key: ${K}\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "K": "sk-ant-api03-verysecretvaluevalue-f3a9"}
    cli = [sys.executable, "-m", "ccproxy.cli", "check-config"]
    out = subprocess.run([*cli, str(good)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "sk-ant-…f3a9" in out.stdout
    assert "verysecret" not in out.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("server:\n  port: -1\n")
    out = subprocess.run([*cli, str(bad)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=30)
    assert out.returncode == 1
    assert "server.port: must be at least 0, got -1" in out.stderr


def test_example_config_is_valid() -> None:
    out = subprocess.run([sys.executable, "-m", "ccproxy.cli", "check-config", str(ROOT / "etc/ccproxy/config.yaml")],
                         capture_output=True, text=True, cwd=ROOT, timeout=30,
                         env={k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")})
    assert out.returncode == 0, out.stderr


def test_installed_twistd_finds_the_plugin(tmp_path: Path) -> None:
    """A normal install must expose the plugin to the `twistd` script, from any directory."""
    twistd = shutil.which("twistd")
    assert twistd is not None
    out = subprocess.run([twistd, "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=60,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert "ccproxy" in out.stdout, out.stdout + out.stderr

