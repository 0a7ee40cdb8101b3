"""How evenly the kernel spreads connections over worker processes: one shared listening socket
as Twisted accepts from it (up to 100 connections per wake-up), the same socket with one accept per
wake-up (what `server.workers` does), and SO_REUSEPORT (a socket per worker).

    python bench/balance.py [--workers 2] [--seconds 5] [--connections 50]

Each worker is a minimal twisted.web server (plain HTTP, a fixed reply) that counts the connections
and requests it served and prints them when stopped; wrk drives each setup in turn. Prints each
worker's share of connections and requests. Only the kernel's choice differs between the rows.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import free_port, wrk  # noqa: E402

WORKER = '''
import os, signal, socket, sys
from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Site
counts = {"connections": 0, "requests": 0}
class Reply(Resource):
    isLeaf = True
    def render(self, request):
        counts["requests"] += 1
        return b'{"ok":true}'
class Counting(Site):
    def buildProtocol(self, addr):
        counts["connections"] += 1
        return super().buildProtocol(addr)
site = Counting(Reply())
site.log = lambda request: None
mode, port = sys.argv[1], int(sys.argv[2])
if mode.startswith("shared"):
    os.set_blocking(3, False)
    port = reactor.adoptStreamPort(3, socket.AF_INET, site)
    if mode == "shared-1":
        from ccproxy.workers.activation import accept_one_at_a_time
        accept_one_at_a_time(port)
else:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", port)); s.listen(1024); s.setblocking(False)
    reactor.adoptStreamPort(s.fileno(), socket.AF_INET, site)
def report(*_):
    print(counts["connections"], counts["requests"], flush=True)
    reactor.callFromThread(reactor.stop)
signal.signal(signal.SIGUSR1, report)
print("ready", flush=True)
reactor.run()
'''


def run(mode: str, workers: int, seconds: int, connections: int) -> None:
    port = free_port()
    shared = None
    procs = []
    if mode.startswith("shared"):
        shared = socket.socket()
        shared.bind(("127.0.0.1", port))
        shared.listen(1024)
    for _ in range(workers):
        kwargs: dict = {}
        if shared is not None:
            fd = shared.fileno()
            # Descriptor 3 is kept too: the dup2 happens before the child closes what it does not keep.
            kwargs = {"pass_fds": (fd, 3), "preexec_fn": lambda fd=fd: os.dup2(fd, 3)}
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, mode, str(port)], stdout=subprocess.PIPE,
                                      text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, **kwargs))
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    result = wrk(f"http://127.0.0.1:{port}/", connections, seconds, threads=2)
    counts = []
    for p in procs:
        p.send_signal(signal.SIGUSR1)
        out, _ = p.communicate(timeout=20)
        counts.append([int(x) for x in out.split()])
    if shared is not None:
        shared.close()
    conns = [c[0] for c in counts]
    reqs = [c[1] for c in counts]
    share = " / ".join(f"{100 * c / max(1, sum(conns)):.0f}%" for c in conns)
    rshare = " / ".join(f"{100 * r / max(1, sum(reqs)):.0f}%" for r in reqs)
    print(f"{mode:<10} {result['rps']:>8.0f} req/s   connections per worker {conns} ({share})   "
          f"requests {rshare}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"== {args.workers} workers, wrk -t2 -c{args.connections} -d{args.seconds}s, plain HTTP ==")
    for _ in range(args.rounds):
        for mode in ("shared", "shared-1", "reuseport"):
            run(mode, args.workers, args.seconds, args.connections)


if __name__ == "__main__":
    main()
