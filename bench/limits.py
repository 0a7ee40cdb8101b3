"""Rate limits: the cost of one decision (memory and Redis), and proxy requests/s with limits off,
on (memory) and on (Redis), in one run.

    python bench/limits.py [--seconds 10] [--connections 50] [--decisions 50000] [--rounds 2]

Needs redis-server, nginx (Debian: nginx-light) and wrk. Every limit of the seed is on (global and
per-IP minute and hour limits, auto_block; per-key tier, daily quota and the key's own limit in the
decision micro-benchmark), set high enough that nothing is refused: the cost measured is the
decision, not the 429.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ccproxy, nginx, row, wrk
from tests.support.redis import RedisServer

HIGH = 1_000_000_000
RATE_LIMITING = {
    "enabled": True,
    "global": {"requests_per_minute": HIGH, "requests_per_hour": HIGH, "burst": HIGH},
    "per_ip": {"requests_per_minute": HIGH, "requests_per_hour": HIGH, "burst": HIGH},
    "per_key": {"default": {"requests_per_minute": HIGH, "daily_quota": HIGH, "burst": HIGH}},
}
AUTO_BLOCK = {"enabled": True, "threshold": HIGH, "duration": "1h"}


def limits_section(state: dict[str, Any]) -> dict[str, Any]:
    return {"security": {"rate_limiting": RATE_LIMITING, "ip_blacklist": {"auto_block": AUTO_BLOCK}},
            "state": state}


def decision_costs(redis_url: str, n: int) -> None:
    """Microseconds per decision through the whole layer (`check`), with 10,000 client addresses and
    an authenticated key: memory in a tight loop; Redis one at a time (latency) and 64 at once
    (throughput). Prints the figures as JSON."""
    from twisted.internet import defer, task

    from ccproxy.blocklist import BlockList
    from ccproxy.config import parse
    from ccproxy.context import Identity
    from ccproxy.limits._layer import build
    from ccproxy.runtime import Deps
    from tests.test_limits_layer import make_ctx

    identity = Identity(key_id="bench-key", tier="default", rate_limit=HIGH)
    contexts = [make_ctx(ip=f"10.0.{i >> 8}.{i & 255}", identity=identity) for i in range(10_000)]
    results: dict[str, float] = {}

    def layer_for(reactor: Any, state: dict[str, Any]) -> Any:
        data = {"server": {"tls": {"enabled": False}}, **limits_section(state)}
        data["security"]["ip_blacklist"]["enabled"] = False
        return build(parse(data).limits, Deps(reactor=reactor, blocklist=BlockList()), None)

    async def timed(layer: Any, count: int, in_flight: int) -> float:
        """Best of five slices, in microseconds per decision: other load on the machine only ever
        slows a slice down."""
        best = float("inf")
        for part in range(5):
            started = time.perf_counter()
            for batch in range(part * count, (part + 1) * count, in_flight):
                ds = [defer.ensureDeferred(layer.check(contexts[(batch + j) % len(contexts)]))
                      for j in range(in_flight)]
                await defer.gatherResults(ds)
            best = min(best, (time.perf_counter() - started) / count * 1e6)
        return best

    async def main(reactor: Any) -> None:
        memory = layer_for(reactor, {"backend": "memory"})
        results["memory"] = await timed(memory, n // 5, 1)
        memory.stop()
        redis = layer_for(reactor, {"backend": "redis", "redis": {"url": redis_url, "timeout": "1s"}})
        for ctx in contexts[:100]:  # connect, load the script
            await redis.check(ctx)
        results["redis_sequential"] = await timed(redis, n // 25, 1)
        results["redis_concurrent"] = await timed(redis, n // 25, 64)
        assert redis.limiter.failures == 0, "Redis calls failed during the benchmark"
        await redis.stop()
        print(json.dumps(results), flush=True)

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))  # exits the process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--decisions", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        redis = RedisServer(work).start()
        try:
            costs = _run_in_child(redis.url, args.decisions)
            proxy = proxy_throughput(work, redis.url, args.seconds, args.connections, args.rounds)
        finally:
            redis.stop()
    print(f"\n== decision cost, whole limits layer, 7 limits + auto_block, {args.decisions} decisions ==")
    print(f"memory                              {costs['memory']:8.1f} us/decision")
    print(f"redis, one at a time (latency)      {costs['redis_sequential']:8.1f} us/decision")
    print(f"redis, 64 in flight (throughput)    {costs['redis_concurrent']:8.1f} us/decision")
    print(f"\n== proxy, wrk -t1 -c{args.connections}, {args.seconds:g}s each, best of {args.rounds} interleaved rounds, "
          "POST /v1/messages over TLS ==")
    for name, r in proxy.items():
        print(row(name, r))
    off = proxy["limits off"]["rps"]
    for name in ("limits on, memory", "limits on, redis"):
        print(f"{name}: throughput x{proxy[name]['rps'] / off:.3f} of limits off "
              f"({(1 - proxy[name]['rps'] / off) * 100:+.1f}% cost)")


def _run_in_child(redis_url: str, n: int) -> dict[str, float]:
    """The micro-benchmark runs the reactor: keep it out of this process (wrk runs come after)."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r}); "
            f"from bench.limits import decision_costs; decision_costs({redis_url!r}, {n})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def proxy_throughput(work: Path, redis_url: str, seconds: float, connections: int,
                     rounds: int) -> dict[str, dict[str, float]]:
    """Each variant `rounds` times, interleaved so that load from elsewhere hits all alike; the best
    round of each is kept."""
    with ccproxy(work, "http://127.0.0.1:1") as probe:
        cert, key = probe["cert"], probe["key"]
    variants = {
        "limits off": {},
        "limits on, memory": limits_section({"backend": "memory"}),
        "limits on, redis": limits_section({"backend": "redis", "redis": {"url": redis_url, "timeout": "1s"}}),
    }
    results: dict[str, dict[str, float]] = {}
    with nginx(work, cert, key) as ports:
        upstream = f"http://127.0.0.1:{ports['http']}"
        for _ in range(rounds):
            for name, extra in variants.items():
                with ccproxy(work, upstream, extra) as proxy:
                    wrk(proxy["url"] + "/v1/messages", connections, 2)  # warm-up
                    r = wrk(proxy["url"] + "/v1/messages", connections, seconds)
                if name not in results or r["rps"] > results[name]["rps"]:
                    results[name] = r
    return results


if __name__ == "__main__":
    main()
