"""Alert webhooks: POST JSON (ccproxy's own shape, Alertmanager's or Slack's), retried with backoff.

Nothing here runs on a request's time: an alert is queued (bounded) and sent by its own loop. A
failing hook is logged once when it starts failing and once when it recovers, not per attempt; each
alert given up after its retries is counted.
"""

from __future__ import annotations

import datetime
import json
import socket
from collections import deque
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet import defer, task
from twisted.logger import Logger

from ccproxy.config.monitoring import WebhookOutput
from ccproxy.monitoring.alerts import Alert

log = Logger()

QUEUE = 1000
FIRST_BACKOFF = 1.0
MAX_BACKOFF = 60.0


def rfc3339(when: float) -> str:
    return datetime.datetime.fromtimestamp(when, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def summary(alert: Alert) -> str:
    who = "all clients" if alert.group_by == "global" else f"{alert.group_by} {alert.group}"
    return (f"{alert.rule}: {alert.count} {alert.detector or alert.condition.split(' ')[0]} "
            f"in {alert.window:g}s from {who} (more than {alert.threshold}); action {alert.action}")


def body(alert: Alert, shape: str, host: str) -> bytes:
    if shape == "alertmanager":
        labels = {"alertname": alert.rule, "severity": "critical", "service": "ccproxy", "instance": host,
                  "group_by": alert.group_by, "group": alert.group, "action": alert.action}
        data: Any = [{"labels": labels,
                      "annotations": {"summary": summary(alert), "condition": alert.condition,
                                      "count": str(alert.count), "window_seconds": f"{alert.window:g}"},
                      "startsAt": rfc3339(alert.at)}]
    elif shape == "slack":
        data = {"text": f":rotating_light: ccproxy on {host}: {summary(alert)}"}
    else:
        data = {"source": "ccproxy", "host": host, **attrs.asdict(alert), "at": rfc3339(alert.at)}
    return json.dumps(data).encode()


class Webhook:
    def __init__(self, output: WebhookOutput, name: str, http: Any, clock: Any,
                 on_given_up: Callable[[str], None] | None = None) -> None:
        self.output = output
        self.name = name
        self.http = http
        self.clock = clock
        self.on_given_up = on_given_up
        self.host = socket.gethostname()
        self.queue: deque[bytes] = deque()
        self.dropped = 0
        self.given_up = 0
        self.failing = False
        self.running: defer.Deferred[None] | None = None
        self.stopped = False

    def send(self, alert: Alert) -> None:
        if len(self.queue) >= QUEUE:
            self.dropped += 1
            self._given_up()
            return
        self.queue.append(body(alert, self.output.format, self.host))
        if self.running is None:
            self.running = defer.ensureDeferred(self._drain())
            self.running.addErrback(lambda f: log.failure("alert webhook {name} stopped", f, name=self.name))

    async def _drain(self) -> None:
        try:
            while self.queue and not self.stopped:
                if not await self._deliver(self.queue[0]):
                    self._given_up()
                if self.queue:
                    self.queue.popleft()
        finally:
            self.running = None

    async def _deliver(self, data: bytes) -> bool:
        delay = FIRST_BACKOFF
        for attempt in range(self.output.retries + 1):
            if self.stopped:
                return False
            error = await self._post(data)
            if error is None:
                if self.failing:
                    self.failing = False
                    log.info("alert webhook {name} delivers again", name=self.name)
                return True
            if not self.failing:
                self.failing = True
                log.error("alert webhook {name} is failing ({error}); retrying with backoff, and not "
                          "logging again until it recovers", name=self.name, error=error)
            if attempt < self.output.retries:
                await task.deferLater(self.clock, delay, lambda: None)
                delay = min(delay * 2, MAX_BACKOFF)
        return False

    async def _post(self, data: bytes) -> str | None:
        d = self.http.post(self.output.url.reveal(), data=data,
                           headers={b"content-type": [b"application/json"], b"user-agent": [b"ccproxy"]})
        d.addTimeout(self.output.timeout, self.clock)
        try:
            response = await d
            await response.content()
        except defer.TimeoutError:
            return f"no answer within {self.output.timeout:g}s"
        except Exception as e:
            return type(e).__name__
        if 200 <= response.code < 300:
            return None
        return f"HTTP {response.code}"

    def _given_up(self) -> None:
        self.given_up += 1
        if self.on_given_up is not None:
            self.on_given_up(self.name)

    def stop(self) -> None:
        self.stopped = True
