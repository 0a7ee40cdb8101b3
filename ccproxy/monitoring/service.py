"""Security monitoring while the daemon runs: the alert engine on the event stream, its actions
(audit record, webhooks, blocks) and the webhooks' senders, following config reloads."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

from ccproxy.config import Config
from ccproxy.config.monitoring import WebhookOutput
from ccproxy.limits import share_block
from ccproxy.monitoring.alerts import Alert, AlertEngine, report
from ccproxy.monitoring.webhooks import Webhook

log = Logger()
DEFAULT_BLOCK = 3600.0


class Monitoring:
    """`engine.observe` is the events observer; the caller registers it while rules exist."""

    def __init__(self, holder: Any, deps: Any, reactor: Any, http: Any = None,
                 on_given_up: Callable[[str], None] | None = None) -> None:
        self.holder = holder
        self.deps = deps
        self.reactor = reactor
        self.http = http
        self.pool: Any = None
        self.on_given_up = on_given_up
        self.engine = AlertEngine(lambda: self.holder.current.config.monitoring, reactor, self.act)
        self.webhooks: dict[tuple[int, WebhookOutput], Webhook] = {}

    def stop(self) -> Any:
        """The engine's observer is registered by the caller (ccproxy.admin.Observers)."""
        for hook in self.webhooks.values():
            hook.stop()
        return self.pool.closeCachedConnections() if self.pool is not None else None

    def act(self, alert: Alert) -> None:
        config: Config = self.holder.current.config
        rule = next((r for r in config.monitoring.rules if r.name == alert.rule), None)
        if rule is None:
            return
        if rule.alerts:
            report(alert)
            for hook in self._hooks(config):
                hook.send(alert)
        if rule.blocks and alert.group_by == "ip":
            duration = rule.duration
            if duration is None:
                block = config.limits.auto_block
                duration = block.duration if block.enabled else DEFAULT_BLOCK
            try:
                self.deps.incident.block_by_rule(alert.group, duration, rule.name)
                share_block(self.holder, alert.group, self.reactor.seconds() + duration)
            except ValueError:
                log.warn("alert rule {rule} cannot block {group}: not an IP address", rule=rule.name,
                         group=alert.group)

    def _hooks(self, config: Config) -> list[Webhook]:
        outputs = config.monitoring.outputs
        wanted = {(i, output) for i, output in enumerate(outputs)}
        for key in list(self.webhooks):
            if key not in wanted:
                self.webhooks.pop(key).stop()
        hooks = []
        for i, output in enumerate(outputs):
            hook = self.webhooks.get((i, output))
            if hook is None:
                hook = self.webhooks[(i, output)] = Webhook(output, f"webhook{i}", self._http(), self.reactor,
                                                            self.on_given_up)
            hooks.append(hook)
        return hooks

    def _http(self) -> Any:
        if self.http is None:
            from ccproxy.auth._http import http_client

            self.http, self.pool = http_client(self.reactor)
        return self.http
