"""CPU per request of ccproxy's own request path, in memory: no TLS, no sockets, no other process.

    python bench/request_path.py [--requests 5000] [--rounds 7] [--policies] [--tree /other/checkout]

The service's own pieces (config parsed from YAML, the layers `build` makes, ProxySite,
HardenedChannel, ProxyResource, Forwarder and the upstream client) carry POST /v1/messages
requests from a StringTransport client to an upstream connection that answers each with nginx's
head and the bench reply in one read. Prints the best of `--rounds` rounds in microseconds of
process CPU per request: the figure to compare two changes by (a loaded machine slows some rounds,
rarely the best one), where bench/floor.py gives the whole daemon's cost over TLS.
`--policies` turns on every request-path policy (the same set as bench/floor.py's third row);
`--tree` measures another checkout's ccproxy (one from before the engine moved under ccproxy/http/
too) with this bench.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if "--tree" in sys.argv:
    sys.path.insert(0, str(Path(sys.argv[sys.argv.index("--tree") + 1]).resolve()))

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from bench.common import MESSAGE, REQUEST
from bench.floor import POLICIES
from ccproxy.blocklist import BlockList
from ccproxy.config import load
from ccproxy.forward import Forwarder
from ccproxy.resource import ProxyResource
from ccproxy.runtime import Deps, RuntimeHolder, build
from ccproxy.site import ProxySite

try:
    from ccproxy.http.budget import Budget
except ImportError:  # a checkout from before the process-wide body budget
    Budget = None  # type: ignore[assignment,misc]

HEAD = (b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1:8443\r\nUser-Agent: wrk\r\n"
        b"content-type: application/json\r\nx-api-key: bench-client-key\r\nanthropic-version: 2023-06-01\r\n"
        b"Content-Length: %d\r\n\r\n" % len(REQUEST))
ANSWER = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Thu, 26 Nov 2026 17:00:00 GMT\r\n"
          b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: keep-alive\r\n\r\n" % len(MESSAGE)
          + MESSAGE)


class Upstream:
    """An endpoint whose one connection is a StringTransport the bench answers on."""

    def __init__(self) -> None:
        self.protocol: Any = None
        self.transport = StringTransport()

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        self.protocol = factory.buildProtocol(None)
        self.protocol.makeConnection(self.transport)
        return defer.succeed(self.protocol)


def pipeline(policies: bool, work: Path) -> tuple[Any, StringTransport, Upstream, Clock]:
    config_data: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 8443, "tls": {"enabled": False}},
        "upstreams": {"anthropic": {"base_url": "http://127.0.0.1:9", "api_key": "sk-ant-bench-upstream-key-0000"},
                      "openai": {"base_url": "http://127.0.0.1:9", "api_key": "sk-bench-upstream-key-00000000"}},
    }
    if policies:
        config_data["security"] = POLICIES["security"]
        os.environ["BENCH_CLIENT_KEY"] = "bench-client-key"
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config_data))
    config = load(str(path))
    clock = Clock()
    fields = attrs.fields_dict(Deps)
    extra: dict[str, Any] = {"incident": None} if "incident" in fields else {}
    if "buffers" in fields:
        extra["buffers"] = Budget(lambda: config.network.ddos.max_buffered_bytes)
    deps = Deps(reactor=clock, blocklist=BlockList(), **extra)
    forwarder = Forwarder(clock)
    upstream = Upstream()
    real_target = forwarder.target
    forwarder.target = lambda u: (real_target(u)[0], upstream, b"")  # type: ignore[method-assign]
    holder = RuntimeHolder(build(config, deps, forwarder))
    site = ProxySite(ProxyResource(holder, clock), clock)
    site.network = lambda: holder.current.config.network
    if "buffers" in fields:
        site.budget = deps.buffers
    channel = site.buildProtocol(None)
    client = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000),
                             hostAddress=IPv4Address("TCP", "127.0.0.1", 8443))
    channel.makeConnection(client)
    return channel, client, upstream, clock


def one(channel: Any, client: StringTransport, upstream: Upstream) -> None:
    channel.dataReceived(HEAD + REQUEST)
    upstream.protocol.dataReceived(ANSWER)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--policies", action="store_true")
    parser.add_argument("--tree", help="another checkout to measure (default: this one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        channel, client, upstream, _ = pipeline(args.policies, Path(tmp))
        one(channel, client, upstream)
        reply = client.value()
        if not reply.startswith(b"HTTP/1.1 200 ") or not reply.endswith(b"}"):
            sys.exit(f"the pipeline did not answer 200:\n{reply.decode('latin-1')}")
        best = float("inf")
        for _ in range(args.rounds):
            client.clear()
            upstream.transport.clear()
            gc.collect()
            start = time.process_time()
            for _ in range(args.requests):
                one(channel, client, upstream)
            best = min(best, (time.process_time() - start) / args.requests)
            if client.value().count(b"HTTP/1.1 200 ") != args.requests:
                sys.exit("some requests were not answered 200")
        print(f"request path{' (policies on)' if args.policies else ''}: {1e6 * best:.1f} us CPU per request "
              f"(best of {args.rounds} x {args.requests})")


if __name__ == "__main__":
    main()
