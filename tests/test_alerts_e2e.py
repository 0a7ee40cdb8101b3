"""Security alert rules in the real daemon: deduplicated webhook alerts, blocks by rule, detectors."""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.admin import security, security_json
from tests.support.daemon import Daemon
from tests.support.waiting import wait_until
from tests.support.webhook import WebhookReceiver
from tests.test_incident_e2e import MESSAGE, connect, restart, status_from, wait_for


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    r = WebhookReceiver()
    yield r
    r.close()


def fail_auth(d: Daemon, n: int, source: str = "127.0.0.2") -> list[int | str]:
    conn = connect(d, source)
    codes: list[int | str] = []
    try:
        for _ in range(n):
            conn.request("POST", "/v1/messages", body=json.dumps(MESSAGE),
                         headers={"x-api-key": "ccp_wrong-key-0000000000000000000", "content-type": "application/json"})
            response = conn.getresponse()
            response.read()
            codes.append(response.status)
    except (ConnectionError, OSError) as e:
        codes.append(type(e).__name__)
    finally:
        conn.close()
    return codes


def settled(d: Daemon) -> None:
    """Wait until the daemon has logged what it did for the requests already answered.

    The alert rules count each event as it is emitted, before the request's answer is sent, and
    an alert is logged (security_alert) before its webhook posts leave. An admin command sent
    after those answers is handled after them: once its log line is there, so is every alert the
    requests raised, and a webhook post can only follow one of those lines.
    """
    done = d.log().count("admin_command command=status ")
    assert security(d, "status").returncode == 0
    wait_for(lambda: d.log().count("admin_command command=status ") > done)


def logged_at(line: str) -> float:
    """When the daemon wrote a log line, by its own clock (twistd's timestamps: whole seconds)."""
    return datetime.datetime.strptime(line.split(" ", 1)[0], "%Y-%m-%dT%H:%M:%S%z").timestamp()


def daemon_time(d: Daemon) -> float:
    """The daemon's clock now: the time of the line an admin command sent now makes it write."""
    settled(d)
    return logged_at([line for line in d.log().splitlines() if "admin_command command=status " in line][-1])


def auth_on(keys: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"enabled": True, "api_keys": keys or [{"id": "k", "key_sha256": "0" * 64}]}


def test_one_deduplicated_alert_after_n_plus_one_failures(daemon: Any, receiver: WebhookReceiver) -> None:
    d = daemon({
        "security": {"auth": auth_on()},
        "monitoring": {
            "security_alerts": [{"name": "multiple_auth_failures", "condition": "auth_failures > 5 in 5m"}],
            "alert_outputs": [{"type": "webhook", "url": receiver.url + "/am", "format": "alertmanager"},
                              {"type": "webhook", "url": receiver.url + "/plain"}],
        },
    })
    assert fail_auth(d, 5) == [401] * 5
    settled(d)
    assert "security_alert" not in d.log() and receiver.posts == []  # five is not more than five
    assert fail_auth(d, 1) == [401]
    wait_for(lambda: len(receiver.posts) == 2)
    assert fail_auth(d, 200) == [401] * 200  # the condition still holds: no new alert
    settled(d)
    assert d.log().count("security_alert rule=multiple_auth_failures") == 1
    assert len(receiver.posts) == 2
    by_path = dict(receiver.posts)
    am = by_path["/am"][0]
    assert am["labels"]["alertname"] == "multiple_auth_failures" and am["labels"]["group"] == "127.0.0.2"
    assert am["annotations"]["count"] == "6" and am["annotations"]["window_seconds"] == "300"
    plain = by_path["/plain"]
    assert (plain["rule"], plain["group_by"], plain["group"], plain["count"], plain["threshold"], plain["window"]) == (
        "multiple_auth_failures", "ip", "127.0.0.2", 6, 5, 300.0)
    log = d.log()
    assert log.count("security_alert rule=multiple_auth_failures") == 1
    assert "[ccproxy.events#critical] security_alert" in log  # severity alert


def test_failing_webhook_is_retried_and_logged_once(daemon: Any, receiver: WebhookReceiver) -> None:
    receiver.fail_next = 2
    d = daemon({
        "security": {"auth": auth_on()},
        "monitoring": {
            "security_alerts": [{"name": "a", "condition": "auth_failures > 0 in 1m"}],
            "alert_outputs": [{"type": "webhook", "url": receiver.url + "/hook"}],
        },
    })
    assert fail_auth(d, 1) == [401]
    wait_for(lambda: len(receiver.posts) == 1, 10.0)  # after 1 s and 2 s of backoff
    assert receiver.attempts == 3
    # The receiver has the post before the daemon has read its answer: wait for the daemon to say so.
    wait_for(lambda: "alert webhook webhook0 delivers again" in d.log(), 10.0)
    log = d.log()
    assert log.count("alert webhook webhook0 is failing (HTTP 503)") == 1
    assert log.count("alert webhook webhook0 delivers again") == 1


def test_block_by_rule_holds_across_restart_and_unblocks_by_command(daemon: Any, receiver: WebhookReceiver) -> None:
    d = daemon({
        "security": {"auth": auth_on()},
        "monitoring": {"security_alerts": [
            {"name": "guessing", "condition": "auth_failures > 3 in 1m", "action": "block_ip", "duration": "1h"},
        ]},
    })
    codes = fail_auth(d, 10)
    assert codes[:4] == [401] * 4 and codes[4] != 401  # the 4th refusal blocks; the connection is closed
    assert status_from(d) == "refused"
    blocks = security_json(d, "list-blocks")["blocks"]
    assert [(b["target"], b["by"]) for b in blocks] == [("127.0.0.2", "rule guessing")]
    assert "security_alert" not in d.log()  # block_ip alone raises no alert
    state = Path(d.config["admin"]["state_dir"]) / "incident.json"
    wait_for(lambda: state.exists() and "127.0.0.2" in state.read_text(), 10.0)  # saved for the restart
    restart(d)
    assert status_from(d) == "refused"
    assert security(d, "unblock-ip", "127.0.0.2").returncode == 0
    wait_for(lambda: status_from(d) == 401, 2.0)


def test_detector_alerts_and_blocks_at_once(daemon: Any, receiver: WebhookReceiver) -> None:
    d = daemon({
        "monitoring": {
            "security_alerts": [{"name": "suspicious_pattern", "condition": "sql_injection_attempt",
                                 "action": "alert_and_block"}],
            "alert_outputs": [{"type": "webhook", "url": receiver.url + "/slack", "format": "slack"}],
        },
    })
    assert status_from(d, key="sk-ant-client") == 200  # a plain request passes
    conn = connect(d)
    body = {**MESSAGE, "messages": [{"role": "user", "content": "name = '' OR 1=1; -- UNION SELECT password"}]}
    conn.request("POST", "/v1/messages", body=json.dumps(body),
                 headers={"x-api-key": "sk-ant-client", "content-type": "application/json"})
    response = conn.getresponse()
    assert response.status == 403
    response.read()
    wait_for(lambda: len(receiver.posts) == 1)
    text = receiver.posts[0][1]["text"]
    assert "suspicious_pattern" in text and "sql_injection_attempt" in text and "127.0.0.2" in text
    assert status_from(d, key="sk-ant-client") == "refused"
    assert status_from(d, key="sk-ant-client", source="127.0.0.1") == 200
    assert "suspicious_request detector=sql_injection_attempt ip_address=127.0.0.2" in d.log()


def test_rules_added_by_a_reload_apply_within_a_second(daemon: Any, receiver: WebhookReceiver) -> None:
    d = daemon({"security": {"auth": auth_on()}})
    config = d.config
    config["monitoring"] = {"security_alerts": [{"name": "late", "condition": "auth_failures > 1 in 1m"}],
                            "alert_outputs": [{"type": "webhook", "url": receiver.url + "/late"}]}
    line = d.reload(config)
    assert "config reloaded" in line
    # The observers follow the config every second. The log's clock has whole seconds: a failure
    # seen once that clock reads two seconds past the reload's line is over a second after it.
    reloaded = logged_at(line)
    wait_until(lambda: daemon_time(d) >= reloaded + 2, 60.0, "the daemon's clock to pass the reload by 2 s")
    assert fail_auth(d, 2, source="127.0.0.10") == [401, 401]
    settled(d)
    assert "security_alert rule=late action=alert group_by=ip count=2" in d.log()
    wait_for(lambda: len(receiver.posts) == 1)
    assert [(path, post["rule"], post["group"]) for path, post in receiver.posts] == [("/late", "late", "127.0.0.10")]
    alerts = d.log().count("security_alert")
    seen = len(receiver.posts)
    del config["monitoring"]
    assert "config reloaded" in d.reload(config)
    assert fail_auth(d, 5, source="127.0.0.3") == [401] * 5
    settled(d)
    assert d.log().count("security_alert") == alerts  # no rules, no alerts
    assert len(receiver.posts) == seen


def test_alerts_keep_addresses_anonymised_in_the_daemon_log(daemon: Any, receiver: WebhookReceiver) -> None:
    d = daemon({
        "security": {"auth": auth_on()},
        "privacy": {"gdpr": {"enabled": True, "anonymize_logs": True}},
        "monitoring": {"security_alerts": [{"name": "a", "condition": "auth_failures > 0 in 1m",
                                            "action": "alert_and_block"}],
                       "alert_outputs": [{"type": "webhook", "url": receiver.url + "/hook"}]},
    })
    assert fail_auth(d, 1)[0] == 401
    wait_for(lambda: len(receiver.posts) == 1)
    assert receiver.posts[0][1]["group"] == "127.0.0.2"  # the operator's webhook gets the address
    lines = [line for line in d.log().splitlines() if "security_alert" in line or "ip_blocked" in line]
    assert len(lines) == 2 and all("127.0.0.0" in line and "127.0.0.2" not in line for line in lines), lines
