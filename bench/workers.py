"""Workers: nginx as a TLS reverse proxy and ccproxy, each with 1 and with N worker processes.

    python bench/workers.py [--workers 2] [--seconds 4] [--connections 50] [--repeat 3] [--only limiter]

In one run against the same nginx upstream (a fixed Messages reply over plain HTTP, with usage),
wrk over TLS drives: nginx proxying with 1 and N workers, ccproxy with default policies with 1 and N
workers, and ccproxy with every request-path policy on (auth, request validation, response
masking, rate limits per address and per key, a daily quota, token budgets, connection caps and
automatic blocking) with 1 and N workers (N workers share limits, budgets and caps through the
supervisor). Each server is measured `--repeat` times in a row; the medians are printed:
requests/s, p50/p99, the scaling ratio (N workers against 1) and CPU-seconds per request, summed
over the whole process tree from /proc (supervisor included), which does not depend much on what
else the machine runs.

Then the cross-worker limiter's own cost: the same every-policy-on servers with their limits off
(`limits off`), so that (policies on - limits off) is what the limits cost per request with one
worker (an in-process store) and with N workers (the supervisor's store, asked over the control
channel); the difference between the two is the price of keeping them exact across workers. The
supervisor's own CPU per request is printed too.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
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

# Every policy of the request path, limits included (set high: measured, never refusing).
ALL_ON = copy.deepcopy(POLICIES)
ALL_ON["security"]["rate_limiting"]["per_key"]["default"].update(
    {"daily_quota": 1_000_000_000, "tokens_per_minute": 1_000_000_000, "daily_token_quota": 1_000_000_000_000})
ALL_ON["security"]["ddos_protection"] = {"max_connections": 100_000, "max_connections_per_ip": 10_000}
# The same without rate limits, budgets or blocks: what remains of ALL_ON when the limiter has nothing
# to decide. (The connection caps stay: they cost once per connection, and wrk keeps its 50 open.)
LIMITS_OFF = copy.deepcopy(ALL_ON)
LIMITS_OFF["security"]["rate_limiting"] = {"enabled": False}
LIMITS_OFF["security"]["ip_blacklist"] = {"auto_block": {"enabled": False}}


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


def measure(name: str, url: str, pid: int, seconds: int, connections: int, repeat: int,
            supervisor: bool = False) -> dict[str, float]:
    """`repeat` wrk runs in a row against one server; each printed, and the medians returned."""
    wrk(url, 10, 2, threads=2)  # warm-up (and every worker started)
    pids = tree(pid)
    runs = []
    for _ in range(repeat):
        before, before_main = cpu_seconds(pids), cpu_seconds([pid])
        result = wrk(url, connections, seconds, threads=2)
        used, used_main = cpu_seconds(pids) - before, cpu_seconds([pid]) - before_main
        served = max(1.0, result["rps"] * seconds)
        result["cpu_us"] = 1e6 * used / served
        result["supervisor_us"] = 1e6 * used_main / served if supervisor else 0.0
        result["cores"] = used / seconds
        runs.append(result)
        print(f"  {name:<40} {_line(result, supervisor)}", flush=True)
    median = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    print(f"{name + ' (median of ' + str(repeat) + ')':<42} {_line(median, supervisor)}", flush=True)
    return median


def _line(r: dict[str, float], supervisor: bool) -> str:
    extra = f"   supervisor {r['supervisor_us']:>4.0f} us" if supervisor else ""
    return (f"{r['rps']:>7.0f} req/s   p50 {r['p50']:>7.2f} ms   p99 {r['p99']:>7.2f} ms   "
            f"{r['cpu_us']:>5.0f} us CPU/request{extra}   {r['cores']:.2f} cores   "
            f"non-2xx {r['non2xx']:.0f}  errors {r['socket_errors']:.0f}")


def ratio(name: str, one: dict[str, float], many: dict[str, float], n: int) -> None:
    per_core_one = one["rps"] / max(one["cores"], 1e-9)
    per_core_many = many["rps"] / max(many["cores"], 1e-9)
    print(f"  {name}: {n} workers / 1 worker = {many['rps'] / one['rps']:.2f}x req/s; "
          f"req/s per core used {per_core_many:.0f} vs {per_core_one:.0f} ({per_core_many / per_core_one:.2f}); "
          f"CPU/request {many['cpu_us']:.0f} vs {one['cpu_us']:.0f} us")


def limiter_cost(results: dict[str, dict[int, dict[str, float]]], n: int) -> None:
    on, off = results["ccproxy, policies on"], results["ccproxy, policies on, limits off"]
    local = on[1]["cpu_us"] - off[1]["cpu_us"]
    shared = on[n]["cpu_us"] - off[n]["cpu_us"]
    print("== the limits' cost, CPU per request (policies on - limits off; medians) ==")
    print(f"  1 worker (in-process store):  {on[1]['cpu_us']:.0f} - {off[1]['cpu_us']:.0f} = {local:.0f} us "
          f"({100 * local / on[1]['cpu_us']:.0f}% of the request)")
    print(f"  {n} workers (supervisor's store): {on[n]['cpu_us']:.0f} - {off[n]['cpu_us']:.0f} = {shared:.0f} us "
          f"({100 * shared / on[n]['cpu_us']:.0f}% of the request; the supervisor itself "
          f"{on[n]['supervisor_us']:.0f} us)")
    print(f"  exact across workers costs {shared - local:.0f} us more per request than in one process "
          f"({100 * (shared - local) / on[n]['cpu_us']:.0f}% of a {n}-worker request)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", choices=("all", "limiter"), default="all",
                        help="limiter: only the every-policy-on servers with and without their limits")
    args = parser.parse_args()
    n, s, c, r = args.workers, args.seconds, args.connections, args.repeat
    env = {"BENCH_CLIENT_KEY": "bench-client-key"}
    setups: list[tuple[str, dict[str, object]]] = [("ccproxy, policies on", ALL_ON),
                                                   ("ccproxy, policies on, limits off", LIMITS_OFF)]
    if args.only == "all":
        setups.insert(0, ("ccproxy", {}))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with nginx(work) as ports:
            upstream = f"http://127.0.0.1:{ports['http']}"
            print(f"== wrk -t2 -c{c} -d{s}s x{r}, POST /v1/messages over TLS, upstream nginx (plain HTTP) ==")
            results: dict[str, dict[int, dict[str, float]]] = {}
            for label, extra in setups:
                results[label] = {}
                for count in (1, n):
                    config = {**extra, "server": {"workers": count}, "admin": {"enabled": False}}
                    with ccproxy(work, upstream, config, env=env) as proxy:
                        time.sleep(1.0 + count)  # the other workers finish starting
                        results[label][count] = measure(f"{label}, {count} worker(s)", proxy["url"] + "/v1/messages",
                                                        proxy["pid"], s, c, r, supervisor=count > 1)
                        cert, key = proxy["cert"], proxy["key"]
            if args.only == "all":
                results["nginx"] = {}
                for count in (1, n):
                    with nginx_proxy(work, ports["http"], cert, key, count) as proxy:
                        results["nginx"][count] = measure(f"nginx proxy, {count} worker(s)",
                                                          f"https://127.0.0.1:{proxy['port']}/v1/messages",
                                                          proxy["pid"], s, c, r)
            print("== scaling (medians) ==")
            for label, by_count in results.items():
                ratio(label, by_count[1], by_count[n], n)
            limiter_cost(results, n)


if __name__ == "__main__":
    main()
