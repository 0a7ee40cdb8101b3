"""What Prometheus metrics cost on the request path: the same daemon with `admin.metrics` off and on.

    python bench/metrics.py [--seconds 5] [--rounds 2]

Every request-path policy is on (API-key auth, rate limits, auto-blocking, validation, masking), so
the events observer sees an event per request as in a real deployment. The two configurations run in
alternation (off, on, off, on, ...) against the same nginx upstream, to spread the noise of a shared
machine over both; each row prints requests/s and CPU per request, then the medians and the difference,
then the hooks' own cost per request measured in process (steadier than the daemon rows).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import ccproxy, free_port, nginx, wrk  # noqa: E402
from bench.floor import POLICIES, cpu_seconds  # noqa: E402


def run(url: str, pid: int, seconds: int) -> tuple[float, float]:
    wrk(url, 10, 2)  # warm-up
    before = cpu_seconds(pid)
    result = wrk(url, 50, seconds)
    used = cpu_seconds(pid) - before
    if result["non2xx"]:
        raise RuntimeError(f"{result['non2xx']:.0f} requests failed")
    return result["rps"], 1e6 * used / (result["rps"] * seconds)


def hooks_cost(n: int = 200_000) -> float:
    """Microseconds the metrics' hooks add to one request, in process: the end-of-request count and
    duration, the upstream timing wrapper, and the events observer seeing the request's
    authentication_success. Steadier than the daemon rows on a shared machine."""
    import asyncio
    import time

    from ccproxy.metrics import Metrics

    metrics = Metrics()

    class Route:
        api, kind = "anthropic", "messages"

        class upstream:
            name = "anthropic"

    class Ctx:
        route = Route()

    class Request:
        ccproxy_ctx, code, ccproxy_started, path, uri = Ctx(), 200, 1.0, b"/v1/messages", b"/v1/messages"

    async def send(*args: object) -> None:
        return None

    timed = metrics.timed_send(send)
    request, route = Request(), Route()
    event = {"ccproxy_event": "authentication_success", "ip_address": "10.0.0.1", "api_key_id": "k"}

    async def bare() -> None:
        for _ in range(n):
            await send(b"POST", route, None, b"")

    async def hooked() -> None:
        for _ in range(n):
            await timed(b"POST", route, None, b"")
            metrics.request_done(request, 1.5)
            metrics.observe(event)

    started = time.perf_counter()
    asyncio.run(bare())
    base = time.perf_counter() - started
    started = time.perf_counter()
    asyncio.run(hooked())
    return 1e6 * (time.perf_counter() - started - base) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    figures: dict[str, list[tuple[float, float]]] = {"metrics off": [], "metrics on": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with nginx(work) as ports:
            upstream = f"http://127.0.0.1:{ports['http']}"
            print(f"== 50 connections, {args.seconds}s, wrk -t1, POST /v1/messages over TLS, policies on ==")
            for _ in range(args.rounds):
                for name, enabled in (("metrics off", False), ("metrics on", True)):
                    admin = {"socket": str(work / "admin.sock"), "state_dir": str(work / "state"),
                             "metrics": {"enabled": enabled, "listen": f"127.0.0.1:{free_port()}"}}
                    with ccproxy(work, upstream, {**POLICIES, "admin": admin},
                                 env={"BENCH_CLIENT_KEY": "bench-client-key"}) as proxy:
                        rps, cpu = run(proxy["url"] + "/v1/messages", proxy["pid"], args.seconds)
                    figures[name].append((rps, cpu))
                    print(f"{name:<12} {rps:>8.0f} req/s   {cpu:>5.0f} us CPU per request")
    # Medians: on a shared machine one disturbed run would move a mean by far more than the cost.
    medians = {name: (statistics.median(r for r, _ in rows), statistics.median(c for _, c in rows))
               for name, rows in figures.items()}
    (off_rps, off_cpu), (on_rps, on_cpu) = medians["metrics off"], medians["metrics on"]
    print(f"median off   {off_rps:>8.0f} req/s   {off_cpu:>5.1f} us CPU per request")
    print(f"median on    {on_rps:>8.0f} req/s   {on_cpu:>5.1f} us CPU per request")
    print(f"throughput {100 * (on_rps - off_rps) / off_rps:+.1f}%   CPU per request "
          f"{100 * (on_cpu - off_cpu) / off_cpu:+.1f}%")
    cost = hooks_cost()
    print(f"the hooks alone, in process: {cost:.2f} us per request = {100 * cost / off_cpu:.1f}% of the "
          f"{off_cpu:.0f} us CPU a request costs with metrics off")


if __name__ == "__main__":
    main()
