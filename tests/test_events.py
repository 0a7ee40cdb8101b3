"""Security events as the daemon log shows them."""

from __future__ import annotations

from typing import Any

from twisted.logger import formatEvent, globalLogPublisher

from ccproxy import events
from ccproxy.audit._scrub import Anonymizer


def capture(**fields: Any) -> dict[str, Any]:
    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        events.emit("connection_refused", "warning", **fields)
    finally:
        globalLogPublisher.removeObserver(seen.append)
    return next(e for e in seen if e.get("ccproxy_event") == "connection_refused")


def test_event_fields_in_log_text() -> None:
    event = capture(ip_address="203.0.113.7", reason="ip_blacklisted")
    assert formatEvent(event) == "connection_refused ip_address=203.0.113.7 reason=ip_blacklisted"
    assert event["severity"] == "warning"


def test_anonymised_addresses_in_log_text_raw_value_kept_for_audit() -> None:
    events.set_address_filter(Anonymizer("truncate").address)
    try:
        event = capture(ip_address="203.0.113.7", client_ip="2001:db8:1:2::5", reason="x")
    finally:
        events.set_address_filter(None)
    text = formatEvent(event)
    assert "203.0.113.7" not in text and "203.0.113.0" in text
    assert "2001:db8:1:2::5" not in text and "2001:db8:1::" in text
    assert event["ip_address"] == "203.0.113.7"  # the audit trail applies its own anonymisation


def test_daemon_log_budget_holds_back_floods_but_observers_get_every_event() -> None:
    from twisted.internet.task import Clock

    clock = Clock()
    direct: list[dict[str, Any]] = []
    logged: list[dict[str, Any]] = []

    def log_observer(event: dict[str, Any]) -> None:
        if event.get("ccproxy_event") in ("flood_test", "other_event_test"):
            logged.append(event)

    def flood(count: int) -> list[dict[str, Any]]:
        """Emit `count` flood_test events; the lines the daemon log got from them."""
        before = len(logged)
        for _ in range(count):
            events.emit("flood_test", "warning", reason="x")
        return logged[before:]

    events.add_observer(direct.append)
    globalLogPublisher.addObserver(log_observer)
    release = events.paced_by(events.LogBudget(clock.seconds, rate=10.0, burst=5.0))
    try:
        assert len(flood(50)) == 5  # the daemon log gets only its burst
        assert len([e for e in direct if e["ccproxy_event"] == "flood_test"]) == 50  # the audit trail sees all
        # Each event name has a budget of its own: flood_test's is spent, this one's is whole.
        events.emit("other_event_test", "info")
        assert logged[-1]["ccproxy_event"] == "other_event_test" and "suppressed" not in logged[-1]
        clock.advance(0.3)  # at 10 lines a second: three more lines' worth, and no more
        refilled = flood(4)
        assert len(refilled) == 3
        assert refilled[0]["suppressed"] == 45  # the first line after a gap says how many were held back
        assert "suppressed=45" in formatEvent(refilled[0])
        assert all("suppressed" not in e for e in refilled[1:])
        clock.advance(3600.0)  # an idle hour refills the bucket to its burst, not beyond
        assert len(flood(20)) == 5
    finally:
        release()
        events.remove_observer(direct.append)
        globalLogPublisher.removeObserver(log_observer)


def test_a_budget_paces_the_daemon_log_only_while_its_owner_holds_it() -> None:
    from twisted.internet.task import Clock

    logged: list[dict[str, Any]] = []

    def log_observer(event: dict[str, Any]) -> None:
        if event.get("ccproxy_event") == "paced_test":
            logged.append(event)

    globalLogPublisher.addObserver(log_observer)
    first = events.LogBudget(Clock().seconds, rate=1.0, burst=1.0)
    second = events.LogBudget(Clock().seconds, rate=1.0, burst=2.0)
    release_first = events.paced_by(first)
    release_second = events.paced_by(second)
    try:
        for _ in range(5):
            events.emit("paced_test")
        assert len(logged) == 2  # the last handed in rules: second's burst of 2
        release_second()
        for _ in range(5):
            events.emit("paced_test")
        assert len(logged) == 3  # back to first's burst of 1, its clock never moved
        release_first()
        release_first()  # twice is harmless
        for _ in range(5):
            events.emit("paced_test")
        assert len(logged) == 8  # the process default: a burst of 200 on the monotonic clock
    finally:
        release_second()
        release_first()
        globalLogPublisher.removeObserver(log_observer)
