"""Records from every security event: shape, filtering, secrets and anonymisation (in process)."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.logger import Logger

from ccproxy import events
from ccproxy.audit._record import BASE_FIELDS, record_hash
from ccproxy.config import ConfigError
from ccproxy.config.audit import KNOWN_EVENTS
from tests.support.audit import Harness, config

EVENT_FIELDS = {
    "authentication_success": {"api_key_id": "key-1", "user_id": "user-1", "method": "POST", "path": "/v1/messages"},
    "authentication_failure": {"reason": "invalid_api_key", "status": 401},
    "rate_limit_exceeded": {"api_key_id": "key-1", "limit": "per_key.requests_per_minute", "status": 429},
    "invalid_request": {"reason": "body is not JSON", "status": 400},
    "configuration_change": {"outcome": "applied", "changed": ["security.auth.api_keys"]},
    "api_key_rotation": {"api_key_id": "key-2", "reason": "rotated"},
    "api_key_rotation_due": {"api_key_id": "key-1", "created": "2025-01-01T00:00:00Z", "age_days": 40.0},
    "rate_limit_backend_unavailable": {"reason": "redis timeout", "policy": "fail_open"},
    "rate_limit_backend_recovered": {"affected_requests": 12},
    "api_key_expiring": {"api_key_id": "key-1", "expires": "2026-01-31", "days_left": 6},
    "ip_auto_blocked": {"reason": "auth_failures", "count": 10, "duration": 600},
    "ip_unblocked": {"reason": "expired"},
    "connection_refused": {"reason": "blocklisted"},
    "request_too_large": {"status": 413, "limit": 10485760, "size": 20000000},
    "request_timeout": {"status": 408, "reason": "headers"},
    "response_masked": {"count": 2, "patterns": ["credit_card"]},
    "upstream_error": {"status": 502, "upstream": "anthropic", "reason": "connection refused"},
    "audit_records_lost": {"count": 3, "output": "syslog tcp 127.0.0.1:514"},
    "audit_file_damaged": {"file": "/var/log/ccproxy/audit.log", "offset": 4096, "partial_bytes": 17},
    "audit_file_replaced": {"file": "/var/log/ccproxy/audit.log", "found": "deleted"},
    "audit_records_missing": {"file": "/var/log/ccproxy/audit.log", "missing_from": 9, "missing_to": 12},
    "privacy_subject_erased": {"subject": "0f" * 16, "kind": "user_id"},
    "ip_blocked": {"reason": "key guessing", "by": "uid=0 pid=42", "until": None},
    "emergency_mode": {"enabled": True, "by": "uid=0 pid=42"},
    "admin_command": {"command": "block-ip", "by": "uid=0 pid=42", "outcome": "done"},
    "security_alert": {"rule": "brute_force", "group_by": "api_key", "group": "key-1", "count": 11, "window": 300.0},
    "suspicious_request": {"detector": "sql_injection_attempt", "path": "/v1/messages"},
}


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path)
    yield h
    h.stop()


@pytest.mark.parametrize("name", KNOWN_EVENTS)
def test_every_event_becomes_a_record(harness: Harness, name: str) -> None:
    fields = EVENT_FIELDS[name]
    events.emit(name, "warning", request_id="req_ccp_0001", ip_address="192.0.2.10", **fields)
    [record] = harness.records()
    assert record["event"] == name
    assert record["severity"] == "warning"
    assert record["timestamp"] == "2026-01-01T00:00:00.000Z"
    assert record["request_id"] == "req_ccp_0001"
    assert record["ip_address"] == "192.0.2.10"
    for base in BASE_FIELDS:
        assert base in record
    for key, value in fields.items():
        assert record[key] == value
    assert record["seq"] == 1 and len(record["hash"]) == 64


def test_unset_base_fields_are_null_and_log_internals_stay_out(harness: Harness) -> None:
    events.emit("invalid_request", "notice", status=400)
    [record] = harness.records()
    assert record["api_key_id"] is None and record["user_id"] is None and record["reason"] is None
    assert not [k for k in record if k.startswith("log_")]
    assert "ccproxy_event" not in record


def test_records_are_chained(harness: Harness) -> None:
    for i in range(3):
        events.emit("invalid_request", "notice", status=400, n=i)
    records = harness.records()
    assert [r["seq"] for r in records] == [1, 2, 3]
    assert records[1]["prev"] == records[0]["hash"] and records[2]["prev"] == records[1]["hash"]
    assert all(record_hash(r, None) == r["hash"] for r in records)


def test_the_events_filter_is_applied_but_losses_are_always_written(tmp_path: Path) -> None:
    h = Harness(tmp_path, {"events": ["authentication_failure"],
                           "outputs": [{"type": "file", "path": str(tmp_path / "audit.log")}]})
    try:
        events.emit("authentication_success", "info", api_key_id="k")
        events.emit("authentication_failure", "warning", reason="invalid_api_key")
        events.emit("audit_records_lost", "error", count=1)
        assert [r["event"] for r in h.records()] == ["authentication_failure", "audit_records_lost"]
    finally:
        h.stop()


def test_unknown_event_names_are_refused_with_a_hint() -> None:
    with pytest.raises(ConfigError) as e:
        config({"events": ["authentication_falure"], "outputs": [{"type": "file", "path": "/tmp/x.log"}]})
    assert e.value.path == "security.audit.events[0]"
    assert "authentication_failure" in e.value.message


def test_other_log_events_are_ignored(harness: Harness) -> None:
    Logger(namespace="something.else").info("hello {who}", who="there")
    assert harness.records() == []


def test_file_is_created_private(harness: Harness) -> None:
    events.emit("invalid_request", "notice")
    harness.records()
    assert stat.S_IMODE(harness.path.stat().st_mode) == 0o600


SECRETS = {
    "upstream": "sk-ant-api03-UPSTREAMSECRETVALUE0000000000000000000000f3a9",
    "hmac": "audit-chain-hmac-key-0123456789",
}


def test_configured_and_credential_shaped_secrets_are_scrubbed(tmp_path: Path) -> None:
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1c2VyLTEyMyIsImV4cCI6OTk5OTk5OTk5OX0.c2lnbmF0dXJlc2lnbmF0dXJl"
    h = Harness(tmp_path, {"hmac_key": SECRETS["hmac"],
                           "outputs": [{"type": "file", "path": str(tmp_path / "audit.log")}]},
                upstreams={"anthropic": {"api_key": SECRETS["upstream"]}})
    try:
        events.emit("authentication_failure", "warning",
                    reason=f"bad key {SECRETS['upstream']} and Bearer {jwt}",
                    header="x-api-key: sk-proj-CLIENTKEY1234567890abcdef",
                    nested={"token": jwt, "list": [SECRETS["hmac"]]})
        assert len(h.records()) == 1
        text = h.path.read_text()
    finally:
        h.stop()
    for secret in (*SECRETS.values(), jwt, "sk-proj-CLIENTKEY1234567890abcdef"):
        assert secret not in text
        assert secret[4:24] not in text
    assert "f3a9" in text  # masked, still recognisable


def test_hmac_key_seals_records(tmp_path: Path) -> None:
    h = Harness(tmp_path, {"hmac_key": SECRETS["hmac"],
                           "outputs": [{"type": "file", "path": str(tmp_path / "audit.log")}]})
    try:
        events.emit("invalid_request", "notice")
        [record] = h.records()
    finally:
        h.stop()
    assert record_hash(record, None) != record["hash"]
    assert record_hash(record, SECRETS["hmac"].encode()) == record["hash"]


@pytest.mark.parametrize(("method", "v4", "v6"), [
    ("truncate", "203.0.113.0", "2001:db8:abcd::"),
])
def test_anonymize_truncates_addresses(tmp_path: Path, method: str, v4: str, v6: str) -> None:
    h = Harness(tmp_path, None, privacy={"gdpr": {"anonymize_logs": True, "anonymize_method": method}})
    try:
        events.emit("connection_refused", "warning", ip_address="203.0.113.77", reason="from 203.0.113.77")
        events.emit("connection_refused", "warning", ip_address="2001:db8:abcd:12::1")
        first, second = h.records()
    finally:
        h.stop()
    assert first["ip_address"] == v4 and first["reason"] == f"from {v4}"
    assert second["ip_address"] == v6


def test_anonymize_hash_is_keyed_and_stable(tmp_path: Path) -> None:
    gdpr = {"anonymize_logs": True, "anonymize_method": "hash", "anonymize_key": "k" * 32}
    h = Harness(tmp_path, None, privacy={"gdpr": gdpr})
    try:
        events.emit("connection_refused", "warning", ip_address="203.0.113.77")
        events.emit("connection_refused", "warning", ip_address="203.0.113.77")
        events.emit("connection_refused", "warning", ip_address="203.0.113.78")
        a, b, c = h.records()
    finally:
        h.stop()
    assert a["ip_address"] == b["ip_address"] != c["ip_address"]
    assert a["ip_address"].startswith("iphash:") and "203.0.113" not in a["ip_address"]


def test_hash_anonymisation_needs_a_key() -> None:
    with pytest.raises(ConfigError) as e:
        config({"enabled": False}, privacy={"gdpr": {"anonymize_logs": True, "anonymize_method": "hash"}})
    assert e.value.path == "privacy.gdpr.anonymize_key"


def test_right_to_deletion_needs_a_master_key() -> None:
    with pytest.raises(ConfigError) as e:
        config({"enabled": False}, privacy={"gdpr": {"right_to_deletion": True}})
    assert e.value.path == "privacy.keys.master_key" and "is required" in e.value.message
    with pytest.raises(ConfigError) as e:
        config({"enabled": False}, privacy={"gdpr": {"right_to_deletion": True}, "keys": {"master_key": "short"}})
    assert e.value.path == "privacy.keys.master_key" and "at least 32" in e.value.message


def test_access_log_goes_to_its_own_output(tmp_path: Path) -> None:
    access = tmp_path / "access.log"
    h = Harness(tmp_path, {"outputs": [{"type": "file", "path": str(tmp_path / "audit.log")},
                                       {"type": "file", "path": str(access), "records": "access"}]})
    try:
        Logger(namespace="ccproxy.access").info(
            "{method} {path} {status}", method="POST", path="/v1/messages", status=200, latency_ms=12.5,
            key_id="key-1", request_id="req_ccp_1", client_ip="198.51.100.4")
        events.emit("invalid_request", "notice")
        [line] = h.records(access)
        [audit] = h.records()
    finally:
        h.stop()
    assert line["event"] == "http_request" and line["method"] == "POST" and line["status"] == 200
    assert line["latency_ms"] == 12.5 and line["api_key_id"] == "key-1" and line["ip_address"] == "198.51.100.4"
    assert line["request_id"] == "req_ccp_1" and line["seq"] == 1
    assert audit["event"] == "invalid_request" and audit["seq"] == 1


def test_reload_reconfigures_outputs(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    other = tmp_path / "other.log"
    try:
        events.emit("invalid_request", "notice", n=1)
        h.reload({"outputs": [{"type": "file", "path": str(other)}]})
        events.emit("configuration_change", "notice", outcome="applied", changed=["security.audit.outputs"])
        old, new = h.records(), h.records(other)
        h.reload({"enabled": False})
        events.emit("invalid_request", "notice", n=2)
        assert h.records(other) == new
    finally:
        h.stop()
    assert [r["seq"] for r in old] == [1]
    assert [(r["event"], r["seq"]) for r in new] == [("configuration_change", 2)]
    assert new[0]["prev"] == old[0]["hash"]


def test_audit_section_without_enabled_runs_and_needs_outputs() -> None:
    with pytest.raises(ConfigError) as e:
        config({"events": ["authentication_failure"]})
    assert e.value.path == "security.audit.outputs"
    assert config({"enabled": False, "outputs": "whatever"}).audit.enabled is False


def test_an_output_that_cannot_open_fails_the_start_but_not_a_reload(tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("")
    bad = {"outputs": [{"type": "file", "path": str(blocked / "audit.log")}]}
    with pytest.raises(OSError):
        Harness(tmp_path, bad)
    h = Harness(tmp_path)
    try:
        h.reload(bad)
        events.emit("invalid_request", "notice")  # logged as critical, does not raise into the emitter
        h.reload({"outputs": [{"type": "file", "path": str(tmp_path / "audit.log")}]})
        events.emit("invalid_request", "notice")
        assert [r["seq"] for r in h.records()] == [1]
    finally:
        h.stop()


def test_access_records_are_anonymized_too(tmp_path: Path) -> None:
    access = tmp_path / "access.log"
    h = Harness(tmp_path, {"outputs": [{"type": "file", "path": str(access), "records": "access"}]},
                privacy={"gdpr": {"anonymize_logs": True}})
    try:
        Logger(namespace="ccproxy.access").info(
            "x", method="GET", path="/ready", status=200, latency_ms=1.0, key_id="-", request_id="-",
            client_ip="2001:db8:abcd:12::1")
        [line] = h.records(access)
    finally:
        h.stop()
    assert line["ip_address"] == "2001:db8:abcd::" and line["api_key_id"] is None and line["request_id"] is None
