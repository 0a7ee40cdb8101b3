"""The floor under ccproxy's throughput: twisted.web over TLS plus ccproxy's upstream client, no policy.

    python bench/floor.py [--seconds 5]

Runs, in one go against the same nginx upstream, a bare forwarder (a twisted.web Site that relays
each request with `ccproxy.http.client`, nothing else) and the real ccproxy daemon, and prints
requests/s and CPU per request for both. The difference is what ccproxy's own layers cost; the bare
figure is what twisted.web's server side and TLS leave for them. A third row runs ccproxy with every
request-path policy on (API-key auth, rate limits, auto-blocking, validation, masking).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import _wait_port, ccproxy, free_port, nginx, wrk  # noqa: E402

BARE = '''
import sys
from twisted.internet import defer, endpoints, reactor
from twisted.internet.protocol import Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from ccproxy.config.server import TLSConfig
from ccproxy.tls import certificate_options
from ccproxy.http.client import UpstreamPool

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
    fields = Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(name: str, url: str, pid: int, seconds: int) -> None:
    wrk(url, 10, 2)  # warm-up
    before = cpu_seconds(pid)
    result = wrk(url, 50, seconds)
    used = cpu_seconds(pid) - before
    per_request = 1e6 * used / (result["rps"] * seconds)
    print(f"{name:<22} {result['rps']:>8.0f} req/s   p50 {result['p50']:>6.2f} ms   p99 {result['p99']:>6.2f} ms"
          f"   {per_request:>5.0f} us CPU per request   non-2xx {result['non2xx']:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with nginx(work) as ports:
            upstream = f"http://127.0.0.1:{ports['http']}"
            print(f"== 50 connections, {args.seconds}s, wrk -t1, POST /v1/messages over TLS ==")
            with ccproxy(work, upstream) as proxy:
                cert, key = proxy["cert"], proxy["key"]
                measure("ccproxy", proxy["url"] + "/v1/messages", proxy["pid"], args.seconds)
            with ccproxy(work, upstream, POLICIES, env={"BENCH_CLIENT_KEY": "bench-client-key"}) as proxy:
                measure("ccproxy, policies on", proxy["url"] + "/v1/messages", proxy["pid"], args.seconds)
            port = free_port()
            bare = subprocess.Popen([sys.executable, "-c", BARE, str(ports["http"]), str(port), str(cert), str(key)],
                                    cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.DEVNULL)
            try:
                _wait_port(port)
                measure("bare forwarder", f"https://127.0.0.1:{port}/v1/messages", bare.pid, args.seconds)
            finally:
                bare.terminate()
                bare.wait(10)


if __name__ == "__main__":
    main()
