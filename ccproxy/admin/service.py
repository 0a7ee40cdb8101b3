"""Setting up the operator's side while the daemon runs: the admin socket, the incident state, the
metrics listener, the alert engine and the event observers they need.

See docs/incident-response.md. `start` is called once by the service, after the public listener.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet import defer, task
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from ccproxy import events, relay
from ccproxy.admin.refusals import HttpRefusals
from ccproxy.admin.server import Admin, listen
from ccproxy.admin.state import IncidentState
from ccproxy.config import Config
from ccproxy.limits import SharedValue
from ccproxy.monitoring.service import Monitoring

if TYPE_CHECKING:
    from ccproxy.metrics import Metrics

log = Logger()

__all__ = ["AdminRunning", "start"]


class Observers:
    """Observers of the security events registered only while the live config needs them: each
    one costs every event (an authentication_success per request) a copy. Checked at start and
    then every second, so a reload that adds the first alert rule applies within a second."""

    def __init__(self, holder: Any, reactor: Any,
                 wanted: list[tuple[Callable[[Config], bool], events.Observer, frozenset[str] | None]]) -> None:
        self.holder = holder
        self.wanted = wanted
        self.on: list[events.Observer] = []
        self.seen: Config | None = None
        self._loop = task.LoopingCall(self.sync)
        self._loop.clock = reactor
        self._loop.start(1.0, now=True).addErrback(lambda f: log.failure("event observers stopped", f))

    def sync(self) -> None:
        config = self.holder.current.config
        if config is self.seen:
            return
        self.seen = config
        for needed, observer, names in self.wanted:
            if needed(config) and observer not in self.on:
                events.add_observer(observer, names)
                self.on.append(observer)
            elif not needed(config) and observer in self.on:
                events.remove_observer(observer)
                self.on.remove(observer)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
        for observer in self.on:
            events.remove_observer(observer)
        self.on = []


class AdminRunning:
    """What `start` set up; `stop` undoes it."""

    def __init__(self, incident: IncidentState) -> None:
        self.incident = incident
        self.ports: list[Any] = []
        self.admin: Admin | None = None
        self.metrics: Metrics | None = None
        self.monitoring: Monitoring | None = None
        self.observers: Observers | None = None

    def stop(self) -> defer.Deferred[Any]:
        self.incident.stop()
        if self.observers is not None:
            self.observers.stop()
        waits = [defer.maybeDeferred(self.monitoring.stop)] if self.monitoring is not None else []
        if self.metrics is not None:
            events.remove_observer(self.metrics.observe)
            relay.stream_events = None
        waits += [defer.maybeDeferred(p.stopListening) for p in self.ports]
        return defer.DeferredList(waits, consumeErrors=True)


def start(holder: Any, deps: Any, reactor: Any, config_path: str, gate: Any, site: Any = None,
          audit: Any = None, serve: bool = True) -> AdminRunning:
    """`serve` False: a worker of several (`server.workers`), whose supervisor serves the admin
    socket and the metrics listener and keeps the incident state (see ccproxy.workers.admin); the
    worker counts its own metrics and follows the supervisor's blocks and emergency switch."""
    incident: IncidentState = deps.incident
    config: Config = holder.current.config
    incident.keeper = serve
    incident.load()  # a worker too: what was blocked is refused from its first connection
    incident.remote = SharedValue(holder, "emergency")  # shared only with the Redis backend
    if serve:
        incident.start()
    incident.on_emergency.append(
        lambda: gate.close_all() if holder.current.config.emergency.close_connections else None
    )
    running = AdminRunning(incident)

    def rebuild(new: Config) -> None:
        from ccproxy.runtime import build

        holder.current = build(new, deps, holder.current.forwarder, holder.current)

    running.admin = Admin(holder, deps, incident, reactor, config_path, gate=gate, rebuild=rebuild)
    if config.admin.socket is not None and serve:
        try:
            running.ports.append(listen(reactor, config.admin.socket, running.admin))
        except OSError as e:
            # The proxy serves on; only the operator's commands are unavailable.
            log.warn("admin socket {path} unavailable: {error}; `ccproxy security` commands will not "
                      "reach this daemon", path=config.admin.socket, error=str(e))
        else:
            log.info("admin socket listening on {path}", path=config.admin.socket)
    if config.admin.metrics.enabled:
        running.metrics = _start_metrics(running, holder, deps, reactor, gate, site, audit, serve)
    metrics = running.metrics
    running.monitoring = Monitoring(
        holder, deps, reactor,
        on_given_up=(lambda name: metrics.alert_delivery_failures.labels(name).inc()) if metrics else None,
    )
    running.observers = Observers(holder, reactor, [
        (lambda c: c.limits.auto_block.enabled, HttpRefusals(holder), HttpRefusals.EVENTS),
        (lambda c: bool(c.monitoring.rules), running.monitoring.engine.observe, None),
    ])
    if incident.emergency and serve:
        log.warn("emergency mode is on (since {since}); `ccproxy security emergency --disable` ends it",
                 since=incident.emergency_since)
    return running


def _start_metrics(running: AdminRunning, holder: Any, deps: Any, reactor: Any, gate: Any, site: Any,
                   audit: Any, serve: bool = True) -> Metrics:
    from ccproxy.metrics import Metrics, MetricsResource, Sources  # prometheus_client: only with metrics on

    metrics = Metrics(Sources(holder, deps, gate, audit), clock=reactor.seconds)
    events.add_observer(metrics.observe)
    relay.stream_events = metrics.stream_data
    if site is not None:
        answered = site.log

        def log_and_count(request: Any) -> None:
            answered(request)
            metrics.request_done(request, reactor.seconds())

        site.log = log_and_count
    forwarder = holder.current.forwarder
    forwarder.send = metrics.timed_send(forwarder.send)
    if serve:
        running.ports.append(listen_metrics(reactor, holder.current.config.admin.metrics, MetricsResource(metrics)))
    return metrics


def listen_metrics(reactor: Any, listen_at: Any, resource: Any) -> MetricsListener:
    """The metrics listener on `admin.metrics.listen`; the proxy serves on without it."""
    from twisted.web.server import Site

    scrapes = Site(resource)
    scrapes.noisy = False
    scrapes.log = lambda request: None  # type: ignore[method-assign]  # scrapes are not access lines
    return MetricsListener(reactor, listen_at, scrapes).start()


class MetricsListener:
    """Listens on the metrics port; while the port is taken (after a restart by handover, the
    process this one replaces holds it until it has drained) it tries again every second."""

    RETRY = 1.0

    def __init__(self, reactor: Any, listen_at: Any, site: Any) -> None:
        self.reactor = reactor
        self.listen_at = listen_at
        self.site = site
        self.port: Any = None
        self.retry: Any = None
        self.failed = False

    def start(self) -> MetricsListener:
        self.retry = None
        at = self.listen_at
        try:
            self.port = self.reactor.listenTCP(at.port, self.site, interface=at.host)
        except CannotListenError as e:
            if not self.failed:
                log.error("metrics listener {host}:{port} unavailable: {error}; trying again every second",
                          host=at.host, port=at.port, error=str(e.socketError))
            self.failed = True
            self.retry = self.reactor.callLater(self.RETRY, self.start)
            return self
        except Exception as e:
            log.error("metrics listener {host}:{port} unavailable: {error}", host=at.host, port=at.port, error=str(e))
            return self
        address = self.port.getHost()
        log.info("metrics on http://{host}:{port}/metrics", host=address.host, port=address.port)
        return self

    def stopListening(self) -> Any:
        if self.retry is not None and self.retry.active():
            self.retry.cancel()
        self.retry = None
        return self.port.stopListening() if self.port is not None else None
