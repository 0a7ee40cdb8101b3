"""Prometheus metrics: one registry per process, served on `admin.metrics.listen` (never the public port).

Most counters are fed by an observer of the security events (ccproxy.events), so the policy layers
know nothing of metrics. Three hooks sit where no event is: the end of every answered request (the
site's access-log call), the upstream's response head (around `Forwarder.send`) and streamed events
(the relay). Label values are bounded: names from fixed sets or from the config, never addresses,
paths or key material; an unexpected value is counted as `other`.

See docs/incident-response.md for the list.
"""

from __future__ import annotations

import bisect
import math
import re
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.process_collector import ProcessCollector
from twisted.web.resource import Resource

from ccproxy.routes import api_for

if TYPE_CHECKING:
    from ccproxy.http.request import ProxyRequest

# Label values must look like names; at most this many distinct ones per label of a metric.
_NAME = re.compile(r"^[a-z0-9_.:-]{1,64}$")
_MAX_VALUES = 64

_RATE_SCOPES = {
    "global_minute": "global", "global_hour": "global", "per_ip_minute": "ip", "per_ip_hour": "ip",
    "per_key_minute": "key", "key_rate_limit": "key", "daily_quota": "quota", "auto_block": "blocked",
    "emergency_per_ip": "emergency",
}
_REFUSAL_EVENTS = {"invalid_request": "malformed", "request_too_large": "size", "request_timeout": "timeout"}
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Bounded:
    """Keeps a label's values to names, and to at most `_MAX_VALUES` of them."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def __call__(self, value: Any) -> str:
        text = str(value) if value is not None else "none"
        if text in self.seen:
            return text
        if len(self.seen) >= _MAX_VALUES or not _NAME.match(text):
            return "other"
        self.seen.add(text)
        return text


class Metrics:
    """The metrics of one daemon. `sources` reads live state at scrape time."""

    def __init__(self, sources: Sources | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.clock = clock
        r = self.registry
        ProcessCollector(registry=r)
        # The per-request figures are plain numbers, turned into metrics only when scraped: a
        # prometheus_client child's lock and per-bucket loop would cost the request path ~4x more.
        self.hot = HotFigures()
        r.register(self.hot)
        self.upstream_errors = Counter("ccproxy_upstream_errors", "Upstream failures",
                                       ["upstream", "kind"], registry=r)
        self.auth_failures = Counter("ccproxy_auth_failures", "Refused credentials", ["reason"], registry=r)
        self.rate_limited = Counter("ccproxy_rate_limited", "Requests refused by a rate limit or quota",
                                    ["scope"], registry=r)
        self.refused = Counter("ccproxy_requests_refused", "Requests refused by a policy", ["reason"], registry=r)
        self.masked = Counter("ccproxy_masked", "Values masked in responses", ["rule"], registry=r)
        self.connections_refused = Counter("ccproxy_connections_refused", "Connections refused at accept",
                                           ["reason"], registry=r)
        self.audit_lost = Counter("ccproxy_audit_records_lost", "Audit records that could not be kept", registry=r)
        self.reloads = Counter("ccproxy_config_reloads", "Config reloads", ["result"], registry=r)
        self.alerts = Counter("ccproxy_security_alerts", "Security alerts raised", ["rule"], registry=r)
        self.alert_delivery_failures = Counter("ccproxy_alert_delivery_failures",
                                               "Alert deliveries given up after their retries", ["output"],
                                               registry=r)
        self._labels = {name: Bounded() for name in ("reason", "rule", "upstream")}
        self._handlers: dict[str, Callable[[dict[str, Any]], None]] = {
            "authentication_failure": self._auth_failure,
            "rate_limit_exceeded": self._rate_limited,
            "invalid_request": self._refusal,
            "request_too_large": self._refusal,
            "request_timeout": self._refusal,
            "connection_refused": self._connection_refused,
            "response_masked": self._masked,
            "upstream_error": self._upstream_error,
            "audit_records_lost": self._audit_lost,
            "configuration_change": self._reload,
            "security_alert": self._alert,
        }
        if sources is not None:
            r.register(sources)

    # -- the events observer

    def observe(self, event: dict[str, Any]) -> None:
        handler = self._handlers.get(event.get("ccproxy_event", ""))
        if handler is not None:
            handler(event)

    def _auth_failure(self, event: dict[str, Any]) -> None:
        self.auth_failures.labels(self._labels["reason"](event.get("reason"))).inc()
        self.refused.labels("auth").inc()

    def _rate_limited(self, event: dict[str, Any]) -> None:
        scope = _RATE_SCOPES.get(str(event.get("limit")), "other")
        self.rate_limited.labels(scope).inc()
        self.refused.labels("blocked" if scope == "blocked" else "rate_limited").inc()

    def _refusal(self, event: dict[str, Any]) -> None:
        name = event["ccproxy_event"]
        reason = "validation" if name == "invalid_request" and event.get("rule") else _REFUSAL_EVENTS[name]
        if name == "request_timeout" and event.get("status") != 408:
            return  # a send timeout or a TLS handshake cut: no request was refused
        self.refused.labels(reason).inc()

    def _connection_refused(self, event: dict[str, Any]) -> None:
        via = event.get("via")
        if via == "emergency":
            self.refused.labels("emergency").inc()
        elif via is not None:  # a client behind a trusted proxy, refused per request
            self.refused.labels("blocked").inc()
        else:
            self.connections_refused.labels(self._labels["reason"](event.get("reason"))).inc()

    def _masked(self, event: dict[str, Any]) -> None:
        counts = event.get("counts")
        if isinstance(counts, dict):
            for rule, n in counts.items():
                self.masked.labels(self._labels["rule"](rule)).inc(n)

    def _upstream_error(self, event: dict[str, Any]) -> None:
        status = event.get("status")
        reason = str(event.get("reason", ""))
        if status == 504:
            kind = "timeout"
        elif reason.startswith("upstream answered"):
            kind = "status_5xx"
        elif "mid-response" in reason or "too large" in reason:
            kind = "broken_response"
        else:
            kind = "unreachable"
        self.upstream_errors.labels(self._labels["upstream"](event.get("upstream")), kind).inc()

    def _audit_lost(self, event: dict[str, Any]) -> None:
        count = event.get("count")
        self.audit_lost.inc(count if isinstance(count, int) and count > 0 else 1)

    def _reload(self, event: dict[str, Any]) -> None:
        self.reloads.labels("applied" if event.get("outcome") == "applied" else "refused").inc()

    def _alert(self, event: dict[str, Any]) -> None:
        self.alerts.labels(self._labels["rule"](event.get("rule"))).inc()

    # -- hooks where no event is

    def request_done(self, request: ProxyRequest, now: float) -> None:
        """Called at the end of every answered request (the site's log call)."""
        ctx = request.ctx
        if ctx is not None:
            api, route = ctx.route.api, ctx.route.kind
        elif request.path in (b"/health", b"/ready"):
            api, route = "none", "health"
        else:
            api, route = api_for(request.target), "none"
        hot = self.hot
        key = (api, route, request.status)
        requests = hot.requests
        requests[key] = requests.get(key, 0) + 1
        hot.duration.observe(api, now - request.started)

    def timed_send(self, send: Callable[..., Any]) -> Callable[..., Any]:
        """Wrap `Forwarder.send` to time the upstream's response head."""
        clock = self.clock
        upstream = self.hot.upstream

        async def send_timed(method: bytes, route: Any, headers: Any, body: bytes) -> Any:
            started = clock()
            response = await send(method, route, headers, body)
            upstream.observe(route.upstream.name, clock() - started)
            return response

        return send_timed

    def stream_data(self, api: str, events: int) -> None:
        if events:
            streams = self.hot.stream_events
            streams[api] = streams.get(api, 0) + events

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class Histograms:
    """Per label value, bucket counts and a sum: one bisect and two additions per observation."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.bounds = buckets
        self.values: dict[str, list[float]] = {}  # label -> [count per bucket..., +Inf count, sum]

    def observe(self, label: str, seconds: float) -> None:
        row = self.values.get(label)
        if row is None:
            if len(self.values) >= _MAX_VALUES:
                label = "other"
                row = self.values.get(label)
            if row is None:
                row = self.values[label] = [0.0] * (len(self.bounds) + 2)
        row[bisect.bisect_left(self.bounds, seconds)] += 1
        row[-1] += seconds

    def family(self, name: str, doc: str, label: str) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, doc, labels=[label])
        for value, row in self.values.items():
            cumulative, buckets = 0.0, []
            for bound, count in zip((*self.bounds, math.inf), row[:-1], strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == math.inf else repr(bound), cumulative))
            family.add_metric([value], buckets, row[-1])
        return family


class HotFigures:
    """The request path's own figures, collected at scrape time."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = {}
        self.stream_events: dict[str, int] = {}
        self.duration = Histograms(_DURATION_BUCKETS)
        self.upstream = Histograms(_DURATION_BUCKETS)

    def describe(self) -> Iterable[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        requests = CounterMetricFamily("ccproxy_requests", "Requests answered, by API, route kind and status",
                                       labels=["api", "route", "status"])
        for (api, route, code), n in self.requests.items():
            requests.add_metric([api, route, str(code)], n)
        yield requests
        streams = CounterMetricFamily("ccproxy_stream_events", "Server-sent events relayed to clients",
                                      labels=["api"])
        for api, n in self.stream_events.items():
            streams.add_metric([api], n)
        yield streams
        yield self.duration.family("ccproxy_request_duration_seconds", "Whole request, first byte to last", "api")
        yield self.upstream.family("ccproxy_upstream_duration_seconds",
                                   "From sending upstream to its response head", "upstream")


class Sources:
    """A collector that reads live state at scrape time: connections, blocks, queues, expiries."""

    def __init__(self, holder: Any, deps: Any, gate: Any = None, audit: Any = None) -> None:
        self.holder = holder
        self.deps = deps
        self.gate = gate
        self.audit = audit
        self._cert: tuple[str | None, float | None] = (None, None)

    def describe(self) -> Iterable[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        runtime = self.holder.current
        config = runtime.config
        yield _gauge("ccproxy_connections_open", "Open client connections", getattr(self.gate, "total", 0))
        yield _gauge("ccproxy_blocked_ips", "Addresses and ranges blocked at accept", len(self.deps.blocklist))
        incident = getattr(self.deps, "incident", None)
        yield _gauge("ccproxy_emergency_mode", "1 while emergency mode is on",
                     1 if incident is not None and incident.emergency else 0)
        yield _gauge("ccproxy_audit_queue_depth", "Audit records waiting to be written or sent", self._audit_depth())
        yield _gauge("ccproxy_state_backend_up", "1 when the rate-limit state backend answers",
                     self._backend_up(runtime))
        expiry = self._certificate_expiry(config)
        if expiry is not None:
            yield _gauge("ccproxy_tls_certificate_expiry_timestamp_seconds",
                         "When the served certificate expires (seconds since the epoch)", expiry)
        keys = GaugeMetricFamily("ccproxy_api_key_expiry_timestamp_seconds",
                                 "When each API key with an expiry expires", labels=["key_id"])
        for key in config.auth.keys if config.auth.enabled else ():
            if key.expires is not None:
                keys.add_metric([key.id], key.expires)
        yield keys

    def _audit_depth(self) -> int:
        sinks = getattr(self.audit, "sinks", None) or {}
        return sum(len(getattr(s, "queue", ())) + len(getattr(s, "buffer", ())) for s in list(sinks.values()))

    def _backend_up(self, runtime: Any) -> int:
        for layer in runtime.layers:
            limiter = getattr(layer, "limiter", None)
            if limiter is not None:
                return 0 if limiter.down_reported or limiter.down_until > self.deps.reactor.seconds() else 1
        return 1

    def _certificate_expiry(self, config: Any) -> float | None:
        tls = config.server.tls
        if not tls.enabled or not tls.cert_file:
            return None
        path = tls.cert_file
        if self._cert[0] != path:
            self._cert = (path, _not_after(path))
        return self._cert[1]


def _not_after(path: str) -> float | None:
    from cryptography import x509

    try:
        with open(path, "rb") as f:
            return x509.load_pem_x509_certificate(f.read()).not_valid_after_utc.timestamp()
    except (OSError, ValueError):
        return None


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


class MetricsResource(Resource):
    """`GET /metrics` in the Prometheus text format, built on the reactor thread (no thread pool:
    the collectors read the daemon's live state)."""

    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self.metrics = metrics

    def render_GET(self, request: Any) -> bytes:
        if request.path != b"/metrics":
            request.setResponseCode(404)
            return b"not found; try /metrics\n"
        return self.render_metrics(request)

    def render_metrics(self, request: Any) -> Any:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return self.metrics.exposition()
