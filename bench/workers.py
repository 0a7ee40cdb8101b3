"""Workers: nginx as a TLS reverse proxy and ccproxy, each with 1 and with N worker processes.

    python bench/workers.py [--workers 2] [--seconds 5] [--connections 50]

In one run against the same nginx upstream (a fixed Messages reply over plain HTTP), wrk over TLS
drives: nginx proxying with 1 and N workers, ccproxy with default policies with 1 and N workers,
and ccproxy with every request-path policy on with 1 and N workers (N workers share limits, caps and
the audit trail through the supervisor). Prints requests/s, p50/p99, the scaling ratio (N workers
against 1) and CPU-seconds per request, summed over the whole process tree from /proc (supervisor
included), which does not depend on what else the machine runs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import _wait_port, ccproxy, free_port, need, nginx, wrk  # noqa: E402
from bench.floor import POLICIES  # noqa: E402


def tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def nginx_proxy(work: Path, upstream_port: int, cert: Path, key: Path, workers: int) -> Iterator[dict[str, int]]:
    port = free_port()
    conf = work / f"proxy-{workers}.conf"
    conf.write_text(f"""
worker_processes {workers};
error_log {work}/proxy-{workers}-error.log;
pid {work}/proxy-{workers}.pid;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {work};
  upstream api {{ server 127.0.0.1:{upstream_port}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {cert}; ssl_certificate_key {key};
    keepalive_requests 1000000;
    location / {{ proxy_pass http://api; proxy_http_version 1.1; proxy_set_header Connection ""; }}
  }}
}}
""")
    proc = subprocess.Popen([need("nginx"), "-c", str(conf), "-p", str(work), "-g", "daemon off;"])
    try:
        _wait_port(port)
        yield {"port": port, "pid": proc.pid}
    finally:
        proc.terminate()
        proc.wait(10)


def measure(name: str, url: str, pid: int, seconds: int, connections: int) -> dict[str, float]:
    wrk(url, 10, 2, threads=2)  # warm-up (and every worker started)
    pids = tree(pid)
    before = cpu_seconds(pids)
    result = wrk(url, connections, seconds, threads=2)
    used = cpu_seconds(pids) - before
    result["cpu_us"] = 1e6 * used / max(1.0, result["rps"] * seconds)
    result["cores"] = used / seconds
    print(f"{name:<34} {result['rps']:>8.0f} req/s   p50 {result['p50']:>7.2f} ms   p99 {result['p99']:>7.2f} ms   "
          f"{result['cpu_us']:>5.0f} us CPU/request   {result['cores']:.2f} cores   "
          f"non-2xx {result['non2xx']:.0f}  errors {result['socket_errors']:.0f}", flush=True)
    return result


def ratio(name: str, one: dict[str, float], many: dict[str, float], n: int) -> None:
    per_core_one = one["rps"] / max(one["cores"], 1e-9)
    per_core_many = many["rps"] / max(many["cores"], 1e-9)
    print(f"  {name}: {n} workers / 1 worker = {many['rps'] / one['rps']:.2f}x req/s; "
          f"req/s per core used {per_core_many:.0f} vs {per_core_one:.0f} ({per_core_many / per_core_one:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=50)
    args = parser.parse_args()
    n, s, c = args.workers, args.seconds, args.connections
    env = {"BENCH_CLIENT_KEY": "bench-client-key"}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with nginx(work) as ports:
            upstream = f"http://127.0.0.1:{ports['http']}"
            print(f"== wrk -t2 -c{c} -d{s}s, POST /v1/messages over TLS, upstream nginx (plain HTTP) ==")
            results: dict[str, dict[int, dict[str, float]]] = {}
            for label, extra in (("ccproxy", {}), ("ccproxy, policies on", POLICIES)):
                results[label] = {}
                for count in (1, n):
                    config = {**extra, "server": {"workers": count}, "admin": {"enabled": False}}
                    with ccproxy(work, upstream, config, env=env) as proxy:
                        time.sleep(1.0 + count)  # the other workers finish starting
                        results[label][count] = measure(f"{label}, {count} worker(s)", proxy["url"] + "/v1/messages",
                                                        proxy["pid"], s, c)
                        cert, key = proxy["cert"], proxy["key"]
            results["nginx"] = {}
            for count in (1, n):
                with nginx_proxy(work, ports["http"], cert, key, count) as proxy:
                    results["nginx"][count] = measure(f"nginx proxy, {count} worker(s)",
                                                      f"https://127.0.0.1:{proxy['port']}/v1/messages",
                                                      proxy["pid"], s, c)
            print("== scaling ==")
            for label, by_count in results.items():
                ratio(label, by_count[1], by_count[n], n)


if __name__ == "__main__":
    main()
