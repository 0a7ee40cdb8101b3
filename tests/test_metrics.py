"""The metrics' arithmetic and label bounds, in memory."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from ccproxy import events
from ccproxy.metrics import Bounded, Histograms, Metrics


def samples(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(m.exposition().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


class _Route:
    api, kind = "openai", "chat_completions"


class _Ctx:
    route = _Route()


class _Request:
    def __init__(self, code: int, path: bytes = b"/openai/v1/chat/completions", ctx: Any = None) -> None:
        self.status, self.path, self.target, self.ctx = code, path, path, ctx
        self.started = 10.0


def test_label_values_are_bounded() -> None:
    bounded = Bounded()
    assert bounded("invalid_api_key") == "invalid_api_key"
    assert bounded("10.1.2.3/evil path") == "other"  # not a name
    assert bounded(None) == "none"
    for i in range(200):
        bounded(f"r{i}")
    assert len(bounded.seen) == 64 and bounded("r199") == "other" and bounded("r1") == "r1"


def test_events_feed_the_counters() -> None:
    m = Metrics()
    for event in (
        {"ccproxy_event": "authentication_failure", "reason": "invalid_api_key"},
        {"ccproxy_event": "rate_limit_exceeded", "limit": "per_ip_minute"},
        {"ccproxy_event": "rate_limit_exceeded", "limit": "auto_block"},
        {"ccproxy_event": "invalid_request", "rule": "max_tokens", "status": 400},
        {"ccproxy_event": "invalid_request", "reason": "bad_header", "status": 400},
        {"ccproxy_event": "request_too_large", "status": 431},
        {"ccproxy_event": "request_timeout", "status": 408},
        {"ccproxy_event": "request_timeout", "reason": "send_timeout"},
        {"ccproxy_event": "connection_refused", "reason": "too_many_connections_per_ip", "ip_address": "10.0.0.1"},
        {"ccproxy_event": "connection_refused", "reason": "ip_auto_blocked", "via": "x-forwarded-for"},
        {"ccproxy_event": "connection_refused", "reason": "emergency_auth_required", "via": "emergency"},
        {"ccproxy_event": "response_masked", "counts": {"emails": 2, "api_keys": 1}},
        {"ccproxy_event": "upstream_error", "upstream": "anthropic", "status": 504, "reason": "timed out"},
        {"ccproxy_event": "upstream_error", "upstream": "openai", "status": 502, "reason": "connection refused"},
        {"ccproxy_event": "audit_records_lost", "count": 7},
        {"ccproxy_event": "configuration_change", "outcome": "applied"},
        {"ccproxy_event": "security_alert", "rule": "brute_force"},
    ):
        m.observe(event)
    s = samples(m)
    assert s[("ccproxy_auth_failures_total", (("reason", "invalid_api_key"),))] == 1
    assert s[("ccproxy_rate_limited_total", (("scope", "ip"),))] == 1
    assert s[("ccproxy_rate_limited_total", (("scope", "blocked"),))] == 1
    refused = {k[1][0][1]: v for k, v in s.items() if k[0] == "ccproxy_requests_refused_total"}
    assert refused == {"auth": 1, "rate_limited": 1, "blocked": 2, "validation": 1, "malformed": 1, "size": 1,
                       "timeout": 1, "emergency": 1}
    assert s[("ccproxy_connections_refused_total", (("reason", "too_many_connections_per_ip"),))] == 1
    assert s[("ccproxy_masked_total", (("rule", "emails"),))] == 2
    assert s[("ccproxy_upstream_errors_total", (("kind", "timeout"), ("upstream", "anthropic")))] == 1
    assert s[("ccproxy_upstream_errors_total", (("kind", "unreachable"), ("upstream", "openai")))] == 1
    assert s[("ccproxy_audit_records_lost_total", ())] == 7
    assert s[("ccproxy_config_reloads_total", (("result", "applied"),))] == 1
    assert s[("ccproxy_security_alerts_total", (("rule", "brute_force"),))] == 1


def test_requests_and_durations() -> None:
    m = Metrics()
    m.request_done(_Request(200, ctx=_Ctx()), 10.02)
    m.request_done(_Request(200, ctx=_Ctx()), 10.3)
    m.request_done(_Request(404, path=b"/elsewhere"), 10.0)
    m.request_done(_Request(200, path=b"/health"), 10.0)
    m.stream_data("anthropic", 3)
    m.stream_data("anthropic", 0)
    s = samples(m)
    assert s[("ccproxy_requests_total", (("api", "openai"), ("route", "chat_completions"), ("status", "200")))] == 2
    assert s[("ccproxy_requests_total", (("api", "anthropic"), ("route", "none"), ("status", "404")))] == 1
    assert s[("ccproxy_requests_total", (("api", "none"), ("route", "health"), ("status", "200")))] == 1
    assert s[("ccproxy_stream_events_total", (("api", "anthropic"),))] == 3
    assert s[("ccproxy_request_duration_seconds_count", (("api", "openai"),))] == 2
    assert abs(s[("ccproxy_request_duration_seconds_sum", (("api", "openai"),))] - 0.32) < 1e-9
    assert s[("ccproxy_request_duration_seconds_bucket", (("api", "openai"), ("le", "0.025")))] == 1
    assert s[("ccproxy_request_duration_seconds_bucket", (("api", "openai"), ("le", "0.5")))] == 2
    assert s[("ccproxy_request_duration_seconds_bucket", (("api", "openai"), ("le", "+Inf")))] == 2


def test_histogram_labels_are_bounded() -> None:
    h = Histograms((1.0,))
    for i in range(100):
        h.observe(f"u{i}", 0.5)
    assert len(h.values) == 65 and h.values["other"][0] == 36


def test_events_observer_sees_emitted_events() -> None:
    m = Metrics()
    events.add_observer(m.observe)
    try:
        events.emit("authentication_failure", "warning", reason="expired_api_key")
    finally:
        events.remove_observer(m.observe)
    assert samples(m)[("ccproxy_auth_failures_total", (("reason", "expired_api_key"),))] == 1


def test_streamed_events_are_counted_across_reads() -> None:
    from twisted.internet import task

    from ccproxy import relay

    class Sink:
        def __init__(self) -> None:
            self.data = b""

        def write(self, data: bytes) -> None:
            self.data += data

    m = Metrics()
    relay.stream_events = m.stream_data
    try:
        sink = Sink()
        r = relay.Relay(sink, task.Clock(), 60.0, lambda length: None, "anthropic", sse=True)  # type: ignore[arg-type]
        # Three events; the second's blank line is split between two reads, the third's too.
        for piece in (b"event: a\ndata: {}\n\nevent: b\ndata: {}\n", b"\nevent: c\ndata: {}\n", b"\n"):
            r.dataReceived(piece)
        plain = relay.Relay(Sink(), task.Clock(), 60.0, lambda length: None, "openai", sse=False)  # type: ignore[arg-type]
        plain.dataReceived(b"{}\n\n{}\n\n")
    finally:
        relay.stream_events = None
    assert samples(m)[("ccproxy_stream_events_total", (("api", "anthropic"),))] == 3
    assert ("ccproxy_stream_events_total", (("api", "openai"),)) not in samples(m)
    assert sink.data.count(b"\n\n") == 3
