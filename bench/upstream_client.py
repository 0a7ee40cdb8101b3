"""CPU per exchange of the upstream client, and per response head ccproxy writes, in memory.

    python bench/upstream_client.py [--exchanges 20000] [--rounds 5]

No sockets: a request goes out on a pooled connection to a StringTransport and a typical upstream
answer (8 headers, a 300-byte JSON body) comes back in one read; a ProxyRequest writes a typical
response (6 headers) to a StringTransport. Prints the best of `--rounds` runs in microseconds of
process CPU, so the cost of the strict reading of heads can be compared between two trees by
running this script from each.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.http_headers import Headers

from ccproxy.http.client import UpstreamPool
from ccproxy.http.request import ProxyRequest
from tests.support.wire import FakeChannel

REPLY = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Thu, 26 Nov 2026 14:00:00 GMT\r\n"
         b"Content-Type: application/json\r\nContent-Length: 300\r\nConnection: keep-alive\r\n"
         b"request-id: req_0123456789\r\nanthropic-ratelimit-requests-remaining: 99\r\n\r\n" + b"x" * 300)
REQUEST_HEADERS = [(b"Host", [b"api.anthropic.com"]), (b"X-Api-Key", [b"sk-ant-bench"]),
                   (b"Content-Type", [b"application/json"]), (b"anthropic-version", [b"2023-06-01"])]
RESPONSE_HEADERS = ((b"content-type", b"application/json"), (b"request-id", b"req_0123456789"),
                    (b"anthropic-ratelimit-requests-remaining", b"99"), (b"x-content-type-options", b"nosniff"),
                    (b"strict-transport-security", b"max-age=31536000"))


class _Endpoint:
    protocol: Any = None

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        self.protocol = factory.buildProtocol(None)
        self.protocol.makeConnection(StringTransport())
        return defer.succeed(self.protocol)


class _Discard(Protocol):
    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        pass


def client_exchanges(n: int) -> None:
    pool, endpoint = UpstreamPool(Clock()), _Endpoint()
    for _ in range(n):
        d = pool.request("bench", endpoint, b"POST", b"/v1/messages", REQUEST_HEADERS, b"{}")
        endpoint.protocol.transport.clear()
        endpoint.protocol.dataReceived(REPLY)
        responses: list[Any] = []
        d.addCallback(responses.append)
        responses[0].deliverBody(_Discard())


def written_heads(n: int) -> None:
    channel = FakeChannel()
    for _ in range(n):
        request = ProxyRequest(channel, b"POST", b"/v1/messages", Headers(), b"", 0.0)
        request.set_status(200, b"OK")
        for name, value in RESPONSE_HEADERS:
            request.response_headers.setRawHeaders(name, [value])
        request.respond(b"x" * 300)
        channel.transport.clear()


def best(work: Callable[[int], None], n: int, rounds: int) -> float:
    work(n // 10)  # warm-up
    times = []
    for _ in range(rounds):
        start = time.process_time()
        work(n)
        times.append(time.process_time() - start)
    return min(times) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--exchanges", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"upstream exchange (request out, head and body in): {best(client_exchanges, args.exchanges, args.rounds):6.2f}"
          " us CPU")
    print(f"response written by ProxyRequest (head and body):  {best(written_heads, args.exchanges, args.rounds):6.2f}"
          " us CPU")


if __name__ == "__main__":
    main()
