"""The floor under ccproxy's throughput: twisted.web over TLS plus ccproxy's upstream client, no policy.

    python bench/floor.py [--seconds 5] [--runs 3] [--against /other/checkout ...] [--rows ccproxy,policies,bare]

Runs, against the same nginx upstream, a bare forwarder (a twisted.web Site that relays each
request with ccproxy's upstream client, nothing else) and the real ccproxy daemon, and prints
requests/s and CPU per request for both. The difference is what ccproxy's own layers cost; the bare
figure is what twisted.web's server side and TLS leave for them. A third row runs ccproxy with every
request-path policy on (API-key auth, rate limits, auto-blocking, validation, masking).

CPU per request is the daemon's CPU time (/proc/PID/stat, all threads) over the requests nginx
served (its stub_status counter) in one window inside a wrk run: wrk's connecting, TLS handshakes
and warm-up come before the window and its end after, so neither is counted. Each row is measured
`--runs` times, the rows taking turns (so a load that comes and goes on a shared machine falls on
all of them alike); every run prints its figures and the share of the machine's CPU that other
processes took meanwhile, and the last lines give each row's median. `--against` measures another
checkout's daemon and bare forwarder in the same turns (e.g. the commit a change is compared with).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import _wait_port, ccproxy, free_port, nginx, wrk  # noqa: E402

CONNECTIONS = 50
WARM = 1.5  # seconds of wrk before the window: connections open, handshakes done
SLICE = 0.5  # seconds

BARE = '''
import sys
from twisted.internet import defer, endpoints, reactor
from twisted.internet.protocol import Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from ccproxy.config.server import TLSConfig
from ccproxy.tls import certificate_options
try:
    from ccproxy.http.client import UpstreamPool
except ImportError:  # a checkout from before the HTTP engine moved under ccproxy/http/
    from ccproxy.upstream import UpstreamPool

upstream_port, port, cert, key = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
pool = UpstreamPool(reactor)
endpoint = endpoints.HostnameEndpoint(reactor, b"127.0.0.1", upstream_port)

class Body(Protocol):
    def __init__(self, request): self.request = request
    def dataReceived(self, data): self.request.write(data)
    def connectionLost(self, reason):
        if not self.request._disconnected: self.request.finish()

class Forward(Resource):
    isLeaf = True
    def render(self, request):
        body = request.content.read()
        headers = [(b"Host", [b"upstream"]), (b"Content-Type", [b"application/json"])]
        def relay(response):
            request.setResponseCode(response.code)
            for name, values in response.headers.getAllRawHeaders():
                if name.lower() not in (b"connection", b"transfer-encoding", b"keep-alive"):
                    request.responseHeaders.setRawHeaders(name, values)
            response.deliverBody(Body(request))
        pool.request("k", endpoint, b"POST", request.uri, headers, body).addCallback(relay).addErrback(lambda f: None)
        return NOT_DONE_YET

site = Site(Forward(), parsePOSTFormSubmission=False)
site.log = lambda request: None
options = certificate_options(TLSConfig(True, cert, key))
reactor.listenTCP(port, TLSMemoryBIOFactory(options, False, site), interface="127.0.0.1")
reactor.run()
'''


# Every request-path policy on, as a deployment would run it (limits high enough never to refuse):
# API-key auth, per-IP and per-key rate limits with auto-blocking, request validation, response masking.
POLICIES = {
    "security": {
        "auth": {"enabled": True, "type": "api_key", "api_keys": [{"key": "${BENCH_CLIENT_KEY}", "name": "bench"}]},
        "rate_limiting": {"enabled": True, "per_ip": {"requests_per_minute": 10_000_000},
                          "per_key": {"default": {"requests_per_minute": 10_000_000}}},
        "ip_blacklist": {"auto_block": {"enabled": True, "threshold": 10_000_000, "duration": "1h"}},
        "request_validation": {"enabled": True},
        "response_sanitization": {"enabled": True, "mask_api_keys": True, "mask_emails": True,
                                  "mask_phone_numbers": True},
    },
}


def cpu_seconds(pid: int) -> float:
    """The process's CPU time, all threads, to the nanosecond (the scheduler's own count)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def machine_seconds() -> float:
    """CPU time used by every process on the machine (all cores), idle and iowait excluded."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def served(status_url: str) -> int:
    text = urllib.request.urlopen(status_url, timeout=5).read().decode()
    return int(re.search(r"^\s*\d+\s+\d+\s+(\d+)", text, re.M).group(1))  # type: ignore[union-attr]


def ticks(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ours(pids: list[int]) -> float:
    """CPU of the bench's own processes (the measured server, nginx and its worker, wrk)."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += ticks(pid)
    return total


def children(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


def measure(url: str, pid: int, seconds: int, status_url: str, nginx_pid: int) -> dict[str, float]:
    """One window of `seconds` inside a wrk run against `url`: the server's CPU per request served,
    over the whole window and in its least disturbed slice (SLICE seconds)."""
    result: dict[str, float] = {}
    load = threading.Thread(target=lambda: result.update(wrk(url, CONNECTIONS, WARM + seconds + 1)))
    load.start()
    time.sleep(WARM)
    bench_pids = [pid, nginx_pid, *children(nginx_pid), *children(os.getpid())]
    machine, mine = machine_seconds(), ours(bench_pids)
    marks = [(cpu_seconds(pid), served(status_url))]
    for _ in range(round(seconds / SLICE)):
        time.sleep(SLICE)
        marks.append((cpu_seconds(pid), served(status_url)))
    others = (machine_seconds() - machine) - (ours(bench_pids) - mine)
    load.join()
    # Each status request is counted by nginx too.
    per_slice = [1e6 * (c1 - c0) / max(n1 - n0 - 1, 1) for (c0, n0), (c1, n1) in itertools.pairwise(marks)]
    count = marks[-1][1] - marks[0][1] - (len(marks) - 1)
    # An estimate: the bench's own processes are also charged for network work done in their
    # context that /proc/stat books apart, so with the machine otherwise idle it can fall below 0.
    others = max(0.0, others)
    return {"us": 1e6 * (marks[-1][0] - marks[0][0]) / max(count, 1), "best": min(per_slice),
            "rps": count / seconds, "others": 100 * others / (seconds * (os.cpu_count() or 1)),
            "p50": result["p50"], "p99": result["p99"], "non2xx": result["non2xx"]}


@contextlib.contextmanager
def bare_forwarder(root: Path, upstream_port: int, cert: Path, key: Path) -> Iterator[dict[str, Any]]:
    port = free_port()
    bare = subprocess.Popen([sys.executable, "-c", BARE, str(upstream_port), str(port), str(cert), str(key)],
                            cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, stderr=subprocess.DEVNULL)
    try:
        _wait_port(port)
        yield {"url": f"https://127.0.0.1:{port}", "pid": bare.pid}
    finally:
        bare.terminate()
        bare.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--against", type=Path, action="append", default=[],
                        help="another checkout, measured in the same turns (may be given more than once)")
    parser.add_argument("--rows", default="ccproxy,policies,bare",
                        help="which rows to run (comma-separated: ccproxy, policies, bare)")
    args = parser.parse_args()
    trees = [("", ROOT)] + [(f" [{other.name}]", other.resolve()) for other in args.against]
    policies_env = {"BENCH_CLIENT_KEY": "bench-client-key"}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with nginx(work) as ports:
            upstream = f"http://127.0.0.1:{ports['http']}"
            status_url = f"{upstream}/nginx-status"
            nginx_pid = int((work / "nginx.pid").read_text())
            with ccproxy(work, upstream) as probe:
                cert, key = probe["cert"], probe["key"]
            rows: list[tuple[str, Callable[[], Any]]] = []
            wanted = set(args.rows.split(","))
            for label, root in trees:
                rows += [row for kind, row in (
                    ("ccproxy", (f"ccproxy{label}", lambda root=root: ccproxy(work, upstream, root=root))),
                    ("policies", (f"ccproxy, policies on{label}",
                                  lambda root=root: ccproxy(work, upstream, POLICIES, env=policies_env, root=root))),
                    ("bare", (f"bare forwarder{label}",
                              lambda root=root: bare_forwarder(root, ports["http"], cert, key))),
                ) if kind in wanted]
            print(f"== {CONNECTIONS} connections, {args.seconds}s windows, {args.runs} runs, wrk -t1, "
                  f"POST /v1/messages over TLS ==")
            figures: dict[str, list[dict[str, float]]] = {name: [] for name, _ in rows}
            for run in range(args.runs):
                for name, start in rows:
                    with start() as server:
                        wrk(server["url"] + "/v1/messages", 10, 1)  # the daemon's first requests
                        f = measure(server["url"] + "/v1/messages", server["pid"], args.seconds, status_url,
                                    nginx_pid)
                    figures[name].append(f)
                    print(f"run {run + 1}  {name:<34} {f['rps']:>6.0f} req/s   p50 {f['p50']:>6.2f} ms   "
                          f"p99 {f['p99']:>6.2f} ms   {f['us']:>5.0f} us CPU per request (best {SLICE:g}s: {f['best']:>4.0f})   "
                          f"non-2xx {f['non2xx']:.0f}   others {f['others']:>3.0f}% of the machine", flush=True)
            print(f"== median of {args.runs} ==")
            for name, runs in figures.items():
                us = [f["us"] for f in runs]
                print(f"{name:<42} {statistics.median(f['rps'] for f in runs):>6.0f} req/s   "
                      f"{statistics.median(us):>5.0f} us CPU per request   (runs: {' '.join(f'{u:.0f}' for u in us)})"
                      f"   best {SLICE:g}s slices: {statistics.median(f['best'] for f in runs):.0f}")


if __name__ == "__main__":
    main()
