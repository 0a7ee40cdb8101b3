"""Response masking: the masker alone, then streaming through ccproxy with masking on and off, one run.

    python bench/masking.py [--mb 16] [--streams 20] [--events 200]

1. Masker throughput (MB/s of UTF-8 text through every built-in rule plus the seed's credit-card
   pattern): whole texts of 64 KiB, and streamed in 20-character deltas; also with a system prompt.
2. The SSE filter's own time per event (in process): what masking adds to each event; and, on a
   long Messages stream of text and tool-use deltas, the per-event cost of reading token usage
   alone (masking off), of part-aware masking with the default parts (tool inputs passed), and of
   masking every part: events/s and the p50/p99 time each event spends in the filter.
3. Per-event latency of an Anthropic SSE stream through two ccproxy daemons (TLS) fed by the same
   fake upstream: one with response_sanitization on, one with it off. Latency of event i is the time
   from the upstream writing it to the client reading it; requests alternate between the daemons.
   The "added" figures are masking-on minus masking-off percentiles.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import ssl
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ccproxy
from ccproxy.content.masking import Masker, Rule, StreamMasker, built_in_rules, prompt_runs, rule_set
from ccproxy.content.parts import Parts
from ccproxy.content.replies import PartMasker
from ccproxy.content.sse import AnthropicStream, EventSplitter, SseFilter, UsageObserver
from ccproxy.content.usage import Usage
from tests.support.upstream import FakeUpstream, Script, anthropic_stream, message_stream

CARD = Rule("credit_card", r"\b\d{4}[\s-]?\d{4}[\s-]?\d{4}[\s-]?\d{4}\b", "XXXX-XXXX-XXXX-XXXX")
SANITIZATION = {"enabled": True, "remove_system_prompts": True, "mask_api_keys": True, "mask_emails": True,
                "mask_phone_numbers": True,
                "mask_patterns": [{"name": CARD.name, "pattern": CARD.pattern, "replacement": CARD.replacement}]}
WORDS = ("the model returns a list of items for each request and then we call def parse(self, data): "
         "return json.loads(data) if data else None # 42 files changed, 1024 insertions(+) at 10:30 "
         "on 2024-05-01 version 1.2.3 user_id=17 x = y + 3; the quick brown fox").split(" ")
SECRETS = ("sk-ant-api03-Zz9Yy8Xx7Ww6Vv5Uu4Tt3Ss2Rr1Qq0", "ops@example.com", "(415) 555-0132",
           "AKIAIOSFODNN7EXAMPLE", "4111 1111 1111 1111", "+44 20 7946 0958")
SYSTEM = ("You are a coding assistant working inside the user's repository. Follow the house style, "
          "never print credentials, and keep answers short unless asked for detail. ") * 20


def corpus(size: int, rng: random.Random, secret_rate: float = 0.0005) -> str:
    """Prose and code with a planted secret every 1/secret_rate words (default: about every 12 KB)."""
    out: list[str] = []
    length = 0
    while length < size:
        piece = rng.choice(SECRETS) if rng.random() < secret_rate else rng.choice(WORDS)
        sep = "\n" if rng.random() < 0.08 else " "
        out.append(piece + sep)
        length += len(piece) + 1
    return "".join(out)


def masker_throughput(mb: float) -> None:
    rules = rule_set((*built_in_rules(True, True, True), CARD))
    chunk = 64 * 1024
    print(f"Masker alone: {len(rules.rules)} rules (every built-in + the seed's credit_card), whole 64 KiB texts, "
          f"best of 3")
    for label, rate_of_secrets in (("a secret every ~12 KB", 0.0005), ("a secret every ~1.4 KB", 0.004)):
        text = corpus(int(mb * 1024 * 1024), random.Random(7), rate_of_secrets)
        size = len(text.encode())
        pieces = [text[i : i + chunk] for i in range(0, len(text), chunk)]
        for prompt in (None, prompt_runs(SYSTEM, 300)):
            best, found = 0.0, 0
            for _ in range(3):
                counts: Counter[str] = Counter()
                start = time.perf_counter()
                for p in pieces:
                    Masker(rules, prompt).mask(p, counts)
                best = max(best, size / (time.perf_counter() - start) / 1e6)
                found = sum(counts.values())
            extra = f" + {len(SYSTEM)}-char system prompt" if prompt else ""
            print(f"  {label}{extra:<30} {best:8.1f} MB/s  ({found} matches in {size / 1e6:.1f} MB)")
    text = corpus(2 * 1024 * 1024, random.Random(7))
    masker = Masker(rules)
    sample = text
    deltas = [sample[i : i + 20] for i in range(0, len(sample), 20)]
    stream = StreamMasker(masker, Counter())
    start = time.perf_counter()
    for d in deltas:
        stream.feed(d)
    stream.close()
    took = time.perf_counter() - start
    print(f"  streamed in 20-char deltas:                 {len(sample.encode()) / took / 1e6:8.1f} MB/s"
          f"  ({took / len(deltas) * 1e6:.1f} us per delta)")


def filter_cost(events: int) -> None:
    """The time the SSE filter itself spends on each event: what masking adds to an event's trip.

    Each stream is run 7 times; "raw" takes every timing, "steady" the fastest of the 7 runs for each
    event, which removes what the shared machine's scheduler adds.
    """
    rng = random.Random(5)
    text = corpus(events * 24, rng)
    stream_events = anthropic_stream([text[i : i + 24] for i in range(0, 24 * events, 24)])
    rules = rule_set((*built_in_rules(True, True, True), CARD))
    # A 30 KB prompt made of the reply's own vocabulary: many partial repeats to chase.
    for label, prompt in (("3 KB system prompt", prompt_runs(SYSTEM, 300)),
                          ("30 KB overlapping prompt", prompt_runs(corpus(30_000, random.Random(3)), 300))):
        per_event: list[list[float]] = [[] for _ in stream_events]
        for _ in range(7):
            counts: Counter[str] = Counter()
            pm = PartMasker(lambda p=prompt: Masker(rules, p), Parts(), False, counts)  # type: ignore[misc]
            sse = SseFilter(AnthropicStream(pm), counts, lambda c: None)
            for i, event in enumerate(stream_events):
                start = time.perf_counter()
                sse.feed(event)
                per_event[i].append((time.perf_counter() - start) * 1000)
            sse.close()
        raw = sorted(t for times in per_event for t in times)
        steady = sorted(min(times) for times in per_event)
        print(f"  SSE filter cost per event, {label} ({len(stream_events)} events x 7):"
              f"\n    raw    p50 {statistics.median(raw):.3f} ms  p99 {raw[int(len(raw) * 0.99) - 1]:.3f} ms"
              f"\n    steady p50 {statistics.median(steady):.3f} ms  p99 {steady[int(len(steady) * 0.99) - 1]:.3f} ms"
              f"  max {steady[-1]:.3f} ms")


def part_costs(events: int) -> None:
    """Per-event cost on a long Messages stream: text deltas, then a tool call's input deltas, with
    usage in message_start and message_delta. Each configuration runs the stream 5 times; the
    figures take, per event, the fastest run (what the scheduler adds is removed)."""
    rng = random.Random(9)
    text = corpus(events * 12, rng)
    tool_input = json.dumps({"file_path": "/home/dev/project/app.py", "content": corpus(events * 12, rng)})
    stream = message_stream("msg_bench", [{"type": "text", "text": text},
                                          {"type": "tool_use", "id": "toolu_b", "name": "Write", "input": tool_input}],
                            piece=24)
    rules = rule_set((*built_in_rules(True, True, True), CARD))
    prompt = prompt_runs(SYSTEM, 300)

    class Split:
        """The floor: cutting the bytes into events, nothing parsed."""

        def __init__(self) -> None:
            self.splitter = EventSplitter()

        def feed(self, data: bytes) -> bytes:
            return b"".join(self.splitter.feed(data))

    def masking(parts: Parts) -> Any:
        counts: Counter[str] = Counter()
        usage = Usage()
        pm = PartMasker(lambda: Masker(rules, prompt), parts, False, counts)
        return SseFilter(AnthropicStream(pm, usage.note), counts, lambda c: None)

    setups = (
        ("split into events only (floor)", Split),
        ("token usage only (masking off)", lambda: UsageObserver(Usage().note, sse=True)),
        ("part-aware masking, default parts", lambda: masking(Parts())),
        ("masking every part (tool inputs too)", lambda: masking(Parts(True, True, True, True))),
    )
    print(f"\nPer-event cost on a long Messages stream ({len(stream)} events: text, then tool-input deltas; "
          f"every built-in rule, credit_card, a {len(SYSTEM)}-char system prompt), fastest of 5 runs per event")
    floor: list[float] = []
    for label, make in setups:
        per_event: list[list[float]] = [[] for _ in stream]
        for _ in range(5):
            f = make()
            for i, event in enumerate(stream):
                start = time.perf_counter()
                f.feed(event)
                per_event[i].append(time.perf_counter() - start)
        best = [min(t) for t in per_event]
        if not floor:
            floor = best
        total = sum(best)
        added = sorted((b - f0) * 1e6 for b, f0 in zip(best, floor, strict=True))
        ordered = sorted(t * 1e6 for t in best)
        print(f"  {label:<40} {len(stream) / total:10,.0f} events/s   per event p50 {statistics.median(ordered):6.1f} us"
              f"  p99 {ordered[int(len(ordered) * 0.99) - 1]:6.1f} us   added over the floor p99 "
              f"{added[int(len(added) * 0.99) - 1]:6.1f} us")


def stream_once(url: str, sent: dict[int, float], count: int, ctx: ssl.SSLContext) -> list[float]:
    """One streamed request; the latency of every content_block_delta event, in ms."""
    host, port = url.split("//")[1].split(":")
    conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=30)
    body = json.dumps({"model": "m", "max_tokens": 100, "stream": True, "system": SYSTEM,
                       "messages": [{"role": "user", "content": "hi"}]})
    conn.request("POST", "/v1/messages", body=body, headers={
        "content-type": "application/json", "x-api-key": "bench", "anthropic-version": "2023-06-01"})
    response = conn.getresponse()
    assert response.status == 200, response.read()
    latencies: list[float] = []
    buffer = b""
    delta = 0
    while True:
        data = response.read1(65536)
        now = time.perf_counter()
        if not data:
            break
        buffer += data
        *events, buffer = buffer.split(b"\n\n")
        for event in events:
            if event.startswith(b"event: content_block_delta") and delta < count:
                latencies.append((now - sent[delta]) * 1000)
                delta += 1
    conn.close()
    return latencies


def streaming_latency(streams: int, events: int, gap: float) -> None:
    rng = random.Random(11)
    text = corpus(events * 24, rng)
    deltas = [text[i : i + 24] for i in range(0, 24 * events, 24)]
    stream_events = anthropic_stream(deltas)
    first_delta = next(i for i, e in enumerate(stream_events) if b"content_block_delta" in e)
    upstream = FakeUpstream()
    # Each event is one small write: without this, Nagle's algorithm on the fake upstream's side
    # holds some of them for the proxy's delayed ACK, which is the test rig, not ccproxy.
    upstream.server.RequestHandlerClass.disable_nagle_algorithm = True  # type: ignore[attr-defined]
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    results: dict[str, list[float]] = {"off": [], "on": []}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            sanitize = {"security": {"response_sanitization": SANITIZATION}}
            with ccproxy(work, upstream.url) as off, ccproxy(work, upstream.url, sanitize) as on:
                for i in range(streams + 2):
                    for name, proxy in (("off", off), ("on", on)) if i % 2 else (("on", on), ("off", off)):
                        sent: dict[int, float] = {}

                        def mark(index: int, sent: dict[int, float] = sent) -> None:
                            # The gap is slept here, so the mark is taken just before the write.
                            time.sleep(gap)
                            if index >= first_delta:
                                sent[index - first_delta] = time.perf_counter()

                        upstream.expect(Script(events=stream_events, headers={"content-type": "text/event-stream"},
                                               before_event=mark))
                        got = stream_once(proxy["url"], sent, len(deltas), ctx)
                        assert len(got) == len(deltas), (name, len(got))
                        if i >= 2:  # the first rounds warm pools and caches
                            results[name].extend(got)
    finally:
        upstream.close()
    print(f"\nSSE through ccproxy (TLS): {streams} streams x {events} deltas of 24 chars per setting, "
          f"{gap * 1000:g} ms apart")
    pct: dict[str, dict[str, float]] = {}
    for name in ("off", "on"):
        values = sorted(results[name])
        pct[name] = {"p50": statistics.median(values), "p99": values[int(len(values) * 0.99) - 1]}
        print(f"  masking {name:<3}: per-event latency p50 {pct[name]['p50']:.3f} ms   p99 {pct[name]['p99']:.3f} ms"
              f"   ({len(values)} events)")
    print(f"  added by masking: p50 {pct['on']['p50'] - pct['off']['p50']:+.3f} ms   "
          f"p99 {pct['on']['p99'] - pct['off']['p99']:+.3f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=16, help="text for the masker alone (MiB)")
    parser.add_argument("--streams", type=int, default=20)
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--gap", type=float, default=0.002, help="seconds between upstream events")
    args: Any = parser.parse_args()
    masker_throughput(args.mb)
    filter_cost(args.events)
    part_costs(args.events * 20)
    streaming_latency(args.streams, args.events, args.gap)


if __name__ == "__main__":
    main()
