"""The long-running service: listens, serves, and reloads its config on SIGHUP."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import signal
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from ccproxy import events
from ccproxy.admin.service import start as start_admin
from ccproxy.admin.state import IncidentState
from ccproxy.blocklist import BlockList
from ccproxy.config import Config, ConfigError, load
from ccproxy.drain import Hurry, drain
from ccproxy.forward import Forwarder
from ccproxy.http.budget import Budget
from ccproxy.network.listener import listener_factory
from ccproxy.notify import Notifier
from ccproxy.resource import ProxyResource
from ccproxy.runtime import Deps, Runtime, RuntimeHolder, build
from ccproxy.site import ProxySite
from ccproxy.tls import ReloadableTLS, certificate_options
from ccproxy.workers import activation, handover, worker
from ccproxy.workers.heldaudit import start_audit

log = Logger()

# After this many connections have closed, the memory they used is handed back to the system.
RELEASE_AFTER = 256
# How often that is looked at.
RELEASE_EVERY = 5.0

# Settings a reload cannot change in place: a new listening socket would be needed.
_RESTART_ONLY = ("server.host", "server.port", "server.tls.enabled", "admin.socket", "admin.state_dir",
                 "admin.metrics.enabled", "admin.metrics.host", "admin.metrics.port",
                 "server.workers")


class ProxyService(Service):
    def __init__(self, config_path: str, config: Config, reactor: Any) -> None:
        self.config_path = config_path
        self.reactor = reactor
        blocklist = BlockList()
        incident = IncidentState(config.admin.state_dir, blocklist, reactor)
        self.deps = Deps(reactor=reactor, blocklist=blocklist, incident=incident,
                         buffers=Budget(lambda: self.config.network.ddos.max_buffered_bytes),
                         shared_store=worker.shared_store(reactor, blocklist))
        # The layers are built in startService: building them connects to Redis and starts timers.
        self.holder = RuntimeHolder(Runtime(config=config, named={}, forwarder=Forwarder(reactor), deps=self.deps))
        self.tls: ReloadableTLS | None = None
        self.port: IListeningPort | None = None
        self.audit: Any = None
        self.admin: Any = None
        self.site: ProxySite | None = None
        self.notifier = Notifier()
        self.url = ""
        self.gate: Any = None
        self.released_at = 0
        self.release = task.LoopingCall(self.release_memory)
        self.unpace: Callable[[], None] = lambda: None
        self.release.clock = reactor

    @property
    def config(self) -> Config:
        return self.holder.current.config

    def startService(self) -> None:
        super().startService()
        unbuilt = self.holder.current
        self.holder.current = build(unbuilt.config, self.deps, unbuilt.forwarder)
        config = self.config
        _apply_privacy(config)
        self.unpace = events.paced_by(events.LogBudget(self.reactor.seconds))
        site = self.site = ProxySite(ProxyResource(self.holder, self.reactor), self.reactor)
        site.access_wanted = lambda: self.holder.current.logs_access
        site.budget = self.deps.buffers
        if config.server.tls.enabled:
            self.tls = ReloadableTLS(certificate_options(config.server.tls))
        else:
            log.warn("TLS is disabled: clients' credentials and prompts cross the network in clear text")
        self.audit = worker.audit_forwarder(self.holder, self.deps) or start_audit(self.holder, self.reactor)
        # Before anything says we are up: a SIGHUP that comes first must reload, not kill.
        signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.reload))
        factory = listener_factory(site, self.tls, self.holder, self.reactor, worker.gate_class())
        self.gate = factory
        self.release.start(RELEASE_EVERY, now=False).addErrback(lambda f: log.failure("memory release stopped", f))
        self.port, source = activation.listen(self.reactor, config.server.host, config.server.port, factory)
        address: Any = self.port.getHost()
        scheme = "https" if self.tls is not None else "http"
        self.url = f"{scheme}://{_hostport(address.host, address.port)}"
        log.info("ccproxy listening on {url} ({source})", url=self.url, source=source)
        self.admin = start_admin(self.holder, self.deps, self.reactor, self.config_path, factory, site, self.audit,
                                 serve=not worker.is_worker())
        self.holder.ready = True
        settle_heap()
        self.handover = handover.attach(self)
        self.notifier.ready(f"listening on {self.url}")

    def reload(self, config: Config | None = None) -> bool:
        """Re-read the config file (or take `config`, already read from it), telling the service
        manager when it starts and ends."""
        self.notifier.reloading(f"reloading {self.config_path}")
        applied = self._reload(config)
        what = "config reloaded" if applied else "config reload refused, previous config serving (see the log)"
        self.notifier.ready(f"listening on {self.url}; {what}")
        return applied

    def _reload(self, config: Config | None = None) -> bool:
        """Re-read the config file; a bad one is refused and the running config keeps serving."""
        old = self.config
        try:
            new = load(self.config_path) if config is None else config
            changed = changed_paths(old.effective(), new.effective())
            _check_restart_only(changed)
            options = certificate_options(new.server.tls) if new.server.tls.enabled else None
        except ConfigError as e:
            reason = "; ".join(str(fault) for fault in e.faults)
            log.error("config reload refused, still serving the previous config: {error}", error=reason)
            events.emit("configuration_change", "error", outcome="refused", reason=reason)
            return False
        self.holder.current = build(new, self.deps, self.holder.current.forwarder, self.holder.current)
        _apply_privacy(new)
        if self.tls is not None and options is not None:
            self.tls.swap(options)
        settle_heap()
        log.info("config reloaded from {path}; changed: {changed}", path=self.config_path, changed=changed)
        events.emit("configuration_change", "notice", outcome="applied", changed=changed)
        return True

    def release_memory(self) -> None:
        """After a burst of connections has gone, give back what they used (see `release_heap`)."""
        closed = self.gate.closed_count if self.gate is not None else 0
        if closed - self.released_at >= RELEASE_AFTER:
            self.released_at = closed
            release_heap()

    def stopService(self) -> defer.Deferred[Any]:
        super().stopService()
        if self.release.running:
            self.release.stop()
        self.unpace()
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        """Stop accepting, drain what is under way, then close the rest; the audit trail closes last."""
        self.holder.ready = False
        timeout = self.config.server.drain_timeout
        self.notifier.stopping(f"stopping: draining for up to {timeout:g}s")
        # A second SIGTERM or SIGINT (an impatient operator) cuts what is left at once.
        hurry = Hurry()

        def again(*_: Any) -> None:
            log.warn("second stop signal: cutting the requests still under way")
            hurry.now()

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.reactor.callFromThread(again))
        if self.port is not None:
            await defer.maybeDeferred(self.port.stopListening)
        if self.site is not None:
            finished, cut = await drain(self.site, self.reactor, timeout, self.notifier.status, hurry)
            if cut:
                log.warn("shutdown: {cut} request(s) still under way after drain_timeout={timeout}s were cut; "
                         "{finished} finished", cut=cut, finished=finished, timeout=timeout)
            elif finished:
                log.info("shutdown: {finished} request(s) under way finished during the drain", finished=finished)
        self.notifier.status("stopping: closing upstream connections and the audit trail")
        waits = [self.holder.current.forwarder.close(), self.holder.current.stop()]
        if self.admin is not None:
            waits.append(self.admin.stop())  # the admin socket, metrics listener, incident state
        await defer.DeferredList(waits, consumeErrors=True)
        if self.audit is not None:
            await defer.DeferredList([defer.maybeDeferred(self.audit.stop)], consumeErrors=True)


def settle_heap() -> None:
    """Keep the cyclic garbage collector off the long-lived heap.

    Everything built at start (modules, config, layers, TLS contexts) is moved out of the
    collector's sight with `gc.freeze`, so its full collections scan only what requests made; and
    young collections run every 10,000 allocations rather than 700. Measured with
    bench/floor.py: about 5% less CPU per request. After a reload the old runtime is collected
    first, then the new heap is frozen in turn.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)
    if _malloc_trim is not None:
        _malloc_trim(0)  # what importing and building left free goes back to the system


def _libc_trim() -> Any:
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


_malloc_trim = _libc_trim()


def release_heap() -> None:
    """Hand memory freed by closed connections back to the system.

    A TLS connection's objects form reference cycles (transport and protocol point at each other):
    they wait for a full collection, which with the higher thresholds `settle_heap` sets may be far
    off. And glibc keeps freed blocks in its heap for reuse: after 2,000 idle TLS connections closed,
    RSS stayed about 55 MB above its level before them (bench/hardening.py). A collection, then
    `malloc_trim`, gives most of it back; it runs only after many connections have closed.
    """
    gc.collect()
    if _malloc_trim is not None:
        _malloc_trim(0)


def _apply_privacy(config: Config) -> None:
    """With anonymised logs, the daemon's own log shows client addresses anonymised too."""
    from ccproxy.audit._scrub import Anonymizer

    audit = config.audit
    if config.privacy.right_to_deletion:
        # Erasure must reach the daemon's log too: personal fields are not written there at all.
        from ccproxy.audit.privacy import PERSONAL

        events.set_address_filter(lambda value: "[personal]", frozenset(PERSONAL))
        return
    if not audit.anonymize_logs:
        events.set_address_filter(None)
        return
    key = audit.anonymize_key.reveal().encode() if audit.anonymize_key else b""
    events.set_address_filter(Anonymizer(audit.anonymize_method, key).address)


def changed_paths(old: Any, new: Any, path: str = "") -> list[str]:
    """Dotted paths whose values differ; values themselves are never reported."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            out += changed_paths(old.get(key), new.get(key), f"{path}.{key}" if path else key)
        return out
    return [] if old == new else [path]


def _check_restart_only(changed: list[str]) -> None:
    for path in _RESTART_ONLY:
        if path in changed:
            raise ConfigError(path, "cannot change on reload; restart ccproxy to apply it")


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
