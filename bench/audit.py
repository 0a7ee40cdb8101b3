"""Audit trail cost: requests/s through ccproxy with the audit trail off and on, in one run.

    python bench/audit.py [--seconds 10] [--connections 50] [--rounds 2]
    python bench/audit.py --per-record 50000


"On" writes every request's access record and every security event to a file and, over TCP, to a
real rsyslogd on loopback (four outputs: audit + access, each to file and syslog). Off and on
alternate for `--rounds` rounds so drift on a shared machine hits both alike.
Needs nginx (Debian: nginx-light), wrk and rsyslog.

`--per-record N` measures instead, in this process, the CPU time per record of the encryption next to
what a record costs anyway: building and chaining N access records as the trail does; sealing their
personal fields per subject (GDPR right_to_deletion: 50 subjects, keys cached as in the daemon);
encrypting a record's line whole (HIPAA encryption_at_rest). The steps are interleaved round by
round, and the best round of each is printed, in microseconds per record.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ccproxy, nginx, row, wrk
from tests.support.rsyslog import Rsyslog

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process: a cost measure that other load on the box barely moves."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def audit_config(work: Path, syslog: Rsyslog, kinds: set[str]) -> dict[str, Any]:
    def tcp(app: str, records: str) -> dict[str, Any]:
        return {"type": "syslog", "protocol": "tcp", "host": "127.0.0.1", "port": syslog.tcp_port,
                "app_name": app, "records": records, "spool_path": str(work / f"spool-{app}")}

    outputs: list[dict[str, Any]] = []
    if "file" in kinds:
        outputs += [{"type": "file", "path": str(work / "audit.log")},
                    {"type": "file", "path": str(work / "access.log"), "records": "access"}]
    if "syslog" in kinds:
        outputs += [tcp("ccp-audit", "audit"), tcp("ccp-access", "access")]
    return {"security": {"audit": {"enabled": True, "hmac_key": "bench-audit-hmac-key-0123456789",
                                   "outputs": outputs}}}


def per_record(count: int, rounds: int = 7) -> None:
    """CPU time per record of each step, the steps interleaved round by round, the best round kept."""
    import time

    from ccproxy.audit._record import Chain, RecordBuilder
    from ccproxy.audit._scrub import Scrubber
    from ccproxy.audit.privacy import AtRest, KeyStore, Sealer
    from ccproxy.audit.privacy._keys import master_key

    with tempfile.TemporaryDirectory() as tmp:
        store = KeyStore(tmp, master_key("bench-master-key-0123456789abcdef0123")).open()
        sealer, at_rest = Sealer(store), AtRest(store.at_rest_key() or b"")
        builder = RecordBuilder(Scrubber(()), None)
        events = [{"request_id": f"req_ccp_{i:08x}", "client_ip": f"10.0.{i % 50}.7", "key_id": f"key-{i % 50}",
                   "user_id": f"user-{i % 50}", "method": "POST", "path": "/v1/messages", "status": 200,
                   "latency_ms": 12.5} for i in range(count)]
        lines = [Chain(None).seal(builder.access(e, 1_767_225_600.0)) for e in events[:1]] * count

        def build_and_chain() -> None:
            chain = Chain(b"bench-hmac-key")
            for event in events:
                chain.seal(builder.access(event, 1_767_225_600.0))

        def seal_personal() -> None:
            for record in records:
                sealer.seal(record)

        def encrypt_line() -> None:
            for line in lines:
                at_rest.seal(line)

        steps = {"build + chain (plain)": build_and_chain, "GDPR: seal personal fields": seal_personal,
                 "HIPAA: encrypt at rest": encrypt_line}
        best = dict.fromkeys(steps, float("inf"))
        for _ in range(rounds):
            records = [builder.access(e, 1_767_225_600.0) for e in events]
            for name, step in steps.items():
                started = time.process_time()
                step()
                best[name] = min(best[name], (time.process_time() - started) / count * 1e6)
    print(f"{'step (CPU time, best of ' + str(rounds) + ')':<34}{'us/record':>10}")
    for name, value in best.items():
        print(f"{name:<34}{value:>10.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--outputs", default="file,syslog", help="file, syslog or file,syslog (default)")
    parser.add_argument("--per-record", type=int, metavar="N", help="measure the encryption's cost per record")
    args = parser.parse_args()
    if args.per_record:
        per_record(args.per_record)
        return
    runs: dict[str, list[dict[str, float]]] = {"audit off": [], "audit on": []}
    cpu_ms: dict[str, list[float]] = {"audit off": [], "audit on": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        syslog = Rsyslog(work).start()
        try:
            with ccproxy(work, "http://127.0.0.1:1") as probe:
                cert, key = probe["cert"], probe["key"]
            with nginx(work, cert, key) as ports:
                upstream = f"http://127.0.0.1:{ports['http']}"
                with ccproxy(work, upstream) as off, ccproxy(
                        work, upstream, audit_config(work, syslog, set(args.outputs.split(",")))) as on:
                    targets = {"audit off": off, "audit on": on}
                    for proxy in targets.values():
                        wrk(proxy["url"] + "/v1/messages", args.connections, 2)  # warm-up
                    for _ in range(args.rounds):
                        for name, proxy in targets.items():
                            before = cpu_seconds(proxy["pid"])
                            result = wrk(proxy["url"] + "/v1/messages", args.connections, args.seconds)
                            used = cpu_seconds(proxy["pid"]) - before
                            runs[name].append(result)
                            cpu_ms[name].append(1000 * used / (result["rps"] * args.seconds))
            access = work / "access.log"
            access_lines = sum(1 for _ in open(access, "rb")) if access.exists() else 0
            received = len(syslog.lines())
        finally:
            syslog.stop()
    print(f"\n== {args.connections} connections, {args.seconds:g}s x {args.rounds} rounds each, "
          "wrk -t1, POST /v1/messages over TLS ==")
    for name, results in runs.items():
        for i, r in enumerate(results):
            print(row(f"{name} (round {i + 1})", r))
    off_rps = statistics.mean(r["rps"] for r in runs["audit off"])
    on_rps = statistics.mean(r["rps"] for r in runs["audit on"])
    print(f"mean: off {off_rps:.0f} req/s, on {on_rps:.0f} req/s: audit costs {100 * (1 - on_rps / off_rps):.1f}%")
    off_cpu = statistics.mean(cpu_ms["audit off"])
    on_cpu = statistics.mean(cpu_ms["audit on"])
    print(f"daemon CPU per request: off {off_cpu:.3f} ms, on {on_cpu:.3f} ms: "
          f"audit costs {100 * (on_cpu / off_cpu - 1):.1f}% more CPU per request")
    print(f"access records written to file: {access_lines}; messages received by rsyslogd: {received}")


if __name__ == "__main__":
    main()
