"""What the daemon holds in memory: what an idle daemon on the example config has loaded, and what a
burst of clients leaves behind once it is over. Objects and entries are counted, never bytes or
seconds (bench/hardening.py --sections memory prints the RSS figures)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from OpenSSL import SSL
from twisted.internet import defer, task

from ccproxy.blocklist import BlockList
from ccproxy.config import parse
from ccproxy.context import RequestContext
from ccproxy.limits._layer import LimitsLayer, build
from ccproxy.limits._plan import PLAN_TTL
from ccproxy.routes import route
from ccproxy.runtime import Deps
from ccproxy.tls import ReloadableTLS, certificate_options
from tests.support.daemon import free_port
from tests.support.requests import FakeRequest

ROOT = Path(__file__).resolve().parents[1]

# Loaded only by the features that need them, all off in the example config (metrics, auth by
# JWT or OAuth2 and its side calls, Redis, GDPR erasure / encryption at rest, several workers).
NOT_AT_IDLE = (
    "prometheus_client", "ccproxy.metrics",
    "treq", "jwt", "ccproxy.auth._http", "ccproxy.auth._jwt", "ccproxy.auth._oauth2",
    "txredisapi",
    "ccproxy.audit.privacy", "cryptography.hazmat.primitives.ciphers.aead",
    "ccproxy.workers.supervisor",
    "importlib.metadata",
)

# twistd as its script runs it; once the service has started and the reactor has run a second,
# the loaded modules are written out and the daemon stops.
_PROBE = """\
import json, sys
from twisted.internet import reactor
from twisted.scripts.twistd import run

OUT = sys.argv.pop(1)

def report():
    with open(OUT, "w") as f:
        json.dump(sorted(sys.modules), f)
    reactor.stop()

reactor.callWhenRunning(reactor.callLater, 1.0, report)
sys.argv[0] = "twistd"
run()
"""


def example_config(tmp: Path) -> Path:
    """etc/ccproxy/config.yaml as shipped, on a free port, with its admin socket, state and
    development certificate in `tmp`."""
    config = yaml.safe_load((ROOT / "etc/ccproxy/config.yaml").read_text())
    config["server"]["port"] = free_port()
    config["admin"].update(socket=str(tmp / "admin.sock"), state_dir=str(tmp / "state"))
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_an_idle_daemon_on_the_example_config_loads_no_optional_feature(tmp_path: Path) -> None:
    out = tmp_path / "modules.json"
    run = subprocess.run(
        [sys.executable, "-c", _PROBE, str(out), "-n", "--pidfile=", "ccproxy", "--config",
         str(example_config(tmp_path))],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120,
    )
    assert out.exists(), run.stdout + run.stderr
    modules = set(json.loads(out.read_text()))
    assert "ccproxy listening on https://127.0.0.1:" in run.stdout, run.stdout
    # The daemon under test is the real one, serving: what it needs is there.
    assert {"ccproxy.service", "ccproxy.limits._memory", "ccproxy.content.masking", "re2"} <= modules
    loaded = [name for name in NOT_AT_IDLE if name in modules]
    assert loaded == [], f"an idle daemon on the example config loaded {loaded}"


def _ctx(ip: str) -> RequestContext:
    request = FakeRequest(b"POST", b"/v1/messages", client=ip)
    upstreams = parse({"server": {"tls": {"enabled": False}}}).upstreams
    return RequestContext(request=request, request_id="req_test", route=route(b"/v1/messages", upstreams),
                          client_ip=ip, started=0.0, body=b"{}", identity=None, method=b"POST",
                          path=b"/v1/messages")


def test_a_burst_of_clients_leaves_no_rate_limit_state_once_it_is_spent() -> None:
    """Each address of a burst gets table entries (its rate limits, its auto-block probe) and a
    remembered plan; once spent they go with no further request to sweep them."""
    clock = task.Clock()
    clock.advance(1_750_000_000.0)
    config = parse({
        "server": {"tls": {"enabled": False}},
        "security": {
            "rate_limiting": {"global": {"requests_per_minute": 100000},
                              "per_ip": {"requests_per_minute": 60, "requests_per_hour": 1000, "burst": 10}},
            "ip_blacklist": {"auto_block": {"enabled": True, "threshold": 100, "duration": "1h"}},
        },
    }).limits
    layer = build(config, Deps(reactor=clock, blocklist=BlockList()), None)
    assert isinstance(layer, LimitsLayer) and layer.limiter is not None
    store: Any = layer.limiter.store
    addresses = [f"10.0.{i // 250}.{i % 250}" for i in range(600)]
    try:
        for ip in addresses:
            for _ in range(3):
                result = defer.ensureDeferred(layer.check(_ctx(ip)))
                assert result.called and not isinstance(getattr(result, "result", None), BaseException)
        assert len(store) >= len(addresses)
        assert store.watched() == len(addresses)
        assert len(layer.planner) == len(addresses)

        # The housekeeping tick runs every second; no request comes.
        for _ in range(int(2 * PLAN_TTL) + 5):
            clock.advance(1.0)
        assert (len(store), store.watched(), len(layer.planner)) == (0, 0, 0)

        # A client that comes back is limited afresh, and remembered again.
        defer.ensureDeferred(layer.check(_ctx(addresses[0])))
        assert len(layer.planner) == 1 and store.watched() == 1 and len(store) > 0
    finally:
        layer.stop()


def test_a_plan_in_use_is_kept_across_ageing() -> None:
    clock = task.Clock()
    config = parse({"server": {"tls": {"enabled": False}},
                    "security": {"rate_limiting": {"per_ip": {"requests_per_minute": 60}}}}).limits
    layer = build(config, Deps(reactor=clock, blocklist=BlockList()), None)
    try:
        rates, _ = layer.planner.plan("10.9.9.9", None, clock.seconds())
        for _ in range(5):
            clock.advance(PLAN_TTL)
            # Used in every period: the very same limits, not ones rebuilt.
            again, _ = layer.planner.plan("10.9.9.9", None, clock.seconds())
            assert rates and [id(r) for r in again] == [id(r) for r in rates]
        clock.advance(PLAN_TTL)
        clock.advance(PLAN_TTL)
        assert len(layer.planner) == 0
    finally:
        layer.stop()


def test_idle_tls_connections_give_their_buffers_back(tmp_path: Path) -> None:
    """OpenSSL frees a connection's read and write buffers (about 34 KB each) while it is idle:
    thousands of kept-alive connections would otherwise hold them all. Twisted's
    CertificateOptions sets the mode; this fails if that stops being so."""
    config = parse({"server": {"tls": {"enabled": True, "self_signed": True, "cert_file": str(tmp_path / "c.pem"),
                                       "key_file": str(tmp_path / "k.pem")}}}, environ={})
    options = certificate_options(config.server.tls)
    # The one context every server connection is made from.
    assert ReloadableTLS(options).options.getContext() is options.getContext()
    assert options.getContext().set_mode(0) & SSL.MODE_RELEASE_BUFFERS
