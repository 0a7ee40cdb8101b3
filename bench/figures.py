"""What metrics cost with `server.workers` > 1, off the request path: a worker's report to the
supervisor (sent on every scrape and once a second) and the supervisor's merge into one answer.

    python bench/figures.py [--workers 4] [--labels 20] [--rounds 200]

The request path is the same code as in one process (ccproxy.metrics: plain numbers), so its cost
is bench/metrics.py's. Here each worker's figures hold `--labels` status codes per route and a
histogram per API, as a busy service would; prints microseconds per report (collect + JSON, in the
worker), per merge (JSON in, sums, exposition, in the supervisor) and the report's size.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ccproxy.metrics import Metrics  # noqa: E402
from ccproxy.workers.figures import Merged, exposition, of_registry  # noqa: E402


def busy(labels: int) -> Metrics:
    m = Metrics()
    for api, route in (("anthropic", "messages"), ("openai", "chat_completions"), ("anthropic", "count_tokens")):
        for code in range(200, 200 + labels):
            request = SimpleNamespace(code=code, path=b"/", uri=b"/", started=0.0,
                                      ctx=SimpleNamespace(route=SimpleNamespace(api=api, kind=route)))
            for _ in range(3):
                m.request_done(request, 0.3)
    m.observe({"ccproxy_event": "authentication_failure", "reason": "invalid_api_key"})
    return m


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--labels", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    workers = [busy(args.labels) for _ in range(args.workers)]
    started = time.perf_counter()
    for _ in range(args.rounds):
        report = json.dumps(of_registry(workers[0].registry), separators=(",", ":"))
    per_report = (time.perf_counter() - started) / args.rounds
    reports = [json.dumps(of_registry(w.registry), separators=(",", ":")) for w in workers]
    own = Metrics()
    started = time.perf_counter()
    for _ in range(args.rounds):
        merged = Merged()
        for pid, text in enumerate(reports):
            merged.update(pid, json.loads(text))
        text = exposition(merged.metrics(of_registry(own.registry, process=True)))
    per_merge = (time.perf_counter() - started) / args.rounds
    print(f"workers {args.workers}, {args.labels} status codes x 3 routes per worker")
    print(f"report (worker):     {per_report * 1e6:8.0f} us, {len(report):,} bytes; once a second: "
          f"{per_report * 100:.3f} % of one core")
    print(f"merge (supervisor):  {per_merge * 1e6:8.0f} us per scrape, exposition {len(text):,} bytes")


if __name__ == "__main__":
    main()
