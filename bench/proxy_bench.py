"""Forwarding overhead: the same load straight at nginx and through ccproxy (TLS, keep-alive), one run.

    python bench/proxy_bench.py [--seconds 10]

Prints requests/s and latency percentiles for 1 and 50 connections, and the proxy/direct ratios.
Needs nginx (Debian: nginx-light) and wrk.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ccproxy, nginx, row, wrk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with ccproxy(work, "http://127.0.0.1:1") as probe:
            cert, key = probe["cert"], probe["key"]  # a certificate for nginx's TLS side too
        with nginx(work, cert, key) as ports:
            upstream = f"http://127.0.0.1:{ports['http']}"
            with ccproxy(work, upstream) as proxy:
                results = {}
                for conns in (1, 50):
                    wrk(proxy["url"] + "/v1/messages", conns, 2)  # warm-up: pools, caches
                    results[("direct http", conns)] = wrk(f"{upstream}/v1/messages", conns, args.seconds)
                    results[("direct https", conns)] = wrk(
                        f"https://127.0.0.1:{ports['https']}/v1/messages", conns, args.seconds)
                    results[("ccproxy https", conns)] = wrk(proxy["url"] + "/v1/messages", conns, args.seconds)
    for conns in (1, 50):
        print(f"\n== {conns} connection(s), {args.seconds:g}s each, wrk -t1, POST /v1/messages ==")
        for name in ("direct http", "direct https", "ccproxy https"):
            print(row(name, results[(name, conns)]))
        direct, proxied = results[("direct https", conns)], results[("ccproxy https", conns)]
        print(f"ccproxy vs direct https: throughput x{proxied['rps'] / direct['rps']:.3f}, "
              f"added p50 {proxied['p50'] - direct['p50']:+.2f} ms, added p99 {proxied['p99'] - direct['p99']:+.2f} ms")


if __name__ == "__main__":
    main()
