"""Shared pieces for the benchmarks: an nginx upstream, a ccproxy daemon, and wrk runs.

Everything listens on loopback and is stopped when the `with` block ends.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
MESSAGE = (
    b'{"id":"msg_bench","type":"message","role":"assistant","model":"claude-sonnet-4-6",'
    b'"content":[{"type":"text","text":"Hello from the benchmark upstream."}],'
    b'"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":12,"output_tokens":8}}'
)
REQUEST = b'{"model":"claude-sonnet-4-6","max_tokens":64,"messages":[{"role":"user","content":"Hello"}]}'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def need(tool: str) -> str:
    path = shutil.which(tool) or (f"/usr/sbin/{tool}" if os.path.exists(f"/usr/sbin/{tool}") else None)
    if path is None:
        sys.exit(f"{tool} is not installed: apt-get install -y {'nginx-light' if tool == 'nginx' else tool}")
    return path


@contextlib.contextmanager
def nginx(workdir: Path, cert: Path | None = None, key: Path | None = None) -> Iterator[dict[str, int]]:
    """nginx answering every request with a fixed Messages reply: http port, and https if given a cert."""
    ports = {"http": free_port()}
    tls = ""
    if cert and key:
        ports["https"] = free_port()
        tls = (f"server {{ listen 127.0.0.1:{ports['https']} ssl; ssl_certificate {cert}; "
               f"ssl_certificate_key {key}; keepalive_requests 1000000; location / {{ "
               f"default_type application/json; return 200 '{MESSAGE.decode()}'; }} }}")
    conf = workdir / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
error_log {workdir}/nginx-error.log;
pid {workdir}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {workdir};
  keepalive_requests 1000000;
  server {{
    listen 127.0.0.1:{ports['http']};
    location / {{ default_type application/json; return 200 '{MESSAGE.decode()}'; }}
    location = /nginx-status {{ stub_status; }}
  }}
  {tls}
}}
""")
    proc = subprocess.Popen([need("nginx"), "-c", str(conf), "-p", str(workdir), "-g", "daemon off;"])
    try:
        _wait_port(ports["http"])
        yield ports
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def ccproxy(workdir: Path, upstream_url: str, extra: dict[str, Any] | None = None,
            env: dict[str, str] | None = None, root: Path = ROOT) -> Iterator[dict[str, Any]]:
    """A ccproxy daemon over TLS (self-signed) forwarding both APIs to `upstream_url`, run from the
    source tree `root` (this one by default; another checkout to compare two versions)."""
    port = free_port()
    config: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": port,
                   "tls": {"enabled": True, "self_signed": True, "cert_file": "cert.pem", "key_file": "key.pem"}},
        "upstreams": {"anthropic": {"base_url": upstream_url, "api_key": "sk-ant-bench-upstream-key-0000"},
                      "openai": {"base_url": upstream_url, "api_key": "sk-bench-upstream-key-00000000"}},
    }
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    path = workdir / f"ccproxy-{port}.yaml"
    path.write_text(yaml.safe_dump(config))
    log = open(workdir / f"ccproxy-{port}.log", "wb")
    proc = subprocess.Popen([sys.executable, "-c", TWISTD, "-n", "--pidfile=", "ccproxy", "--config", str(path)],
                            cwd=root, env={**os.environ, "PYTHONPATH": str(root), **(env or {})},
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        scheme = "https" if config["server"].get("tls", {}).get("enabled", True) else "http"
        _wait_ready(f"{scheme}://127.0.0.1:{port}/ready", proc, workdir / f"ccproxy-{port}.log")
        yield {"port": port, "url": f"{scheme}://127.0.0.1:{port}", "pid": proc.pid, "workdir": workdir,
               "cert": workdir / "cert.pem", "key": workdir / "key.pem"}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def wrk(url: str, connections: int, seconds: float, threads: int = 1, body: bytes = REQUEST,
        headers: dict[str, str] | None = None) -> dict[str, float]:
    """Run wrk (POST with a JSON body); requests/s and latency percentiles in ms."""
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    all_headers = {"content-type": "application/json", "x-api-key": "bench-client-key",
                   "anthropic-version": "2023-06-01", **(headers or {})}
    lua_headers = "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in all_headers.items())
    script.write_text(f'wrk.method = "POST"\nwrk.body = [[{body.decode()}]]\n{lua_headers}')
    out = subprocess.run([need("wrk"), f"-t{threads}", f"-c{connections}", f"-d{int(seconds)}s", "--latency",
                          "-s", str(script), url], capture_output=True, text=True, timeout=seconds + 60)
    script.unlink()
    text = out.stdout
    if "Requests/sec" not in text:
        raise RuntimeError(f"wrk failed against {url}:\n{out.stdout}\n{out.stderr}")
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))}  # type: ignore[union-attr]
    for pct in ("50", "90", "99"):
        m = re.search(rf"^\s+{pct}(?:\.000)?%\s+([\d.]+)(us|ms|s)", text, re.M)
        result[f"p{pct}"] = float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    result["non2xx"] = float(errors.group(1)) if errors else 0.0
    sock_err = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    result["socket_errors"] = float(sum(int(x) for x in sock_err.groups())) if sock_err else 0.0
    return result


def _wait_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 20) -> None:
    import ssl

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ccproxy exited:\n{log.read_text()}")
        with contextlib.suppress(OSError):
            if urllib.request.urlopen(url, context=ctx, timeout=2).status == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"ccproxy not ready:\n{log.read_text()}")


def row(name: str, r: dict[str, float]) -> str:
    return (f"{name:<34} {r['rps']:>10.0f} req/s   p50 {r['p50']:>7.2f} ms   p90 {r['p90']:>7.2f} ms   "
            f"p99 {r['p99']:>7.2f} ms   non-2xx {int(r['non2xx'])}  sock-err {int(r['socket_errors'])}")
