"""The observer: security events and access lines in, sealed records out to every output."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, threads
from twisted.logger import ILogObserver, Logger, LogPublisher, globalLogPublisher
from twisted.python import threadable
from zope.interface import implementer

from ccproxy import events
from ccproxy.audit._file import FileSink, RunInThread, resume_point
from ccproxy.audit._record import GENESIS, Chain, RecordBuilder
from ccproxy.audit._scrub import Anonymizer, Scrubber, config_secrets
from ccproxy.audit._syslog import SyslogSink
from ccproxy.config.audit import AuditConfig, FileOutput, Output
from ccproxy.config.audit import SyslogOutput as SyslogSpec
from ccproxy.site import ACCESS_PUBLISHER

ACCESS_NAMESPACE = "ccproxy.access"
log = Logger(namespace="ccproxy.audit")
Sink = FileSink | SyslogSink


@implementer(ILogObserver)
class AuditTrail:
    """Follows `holder.current.config`: a reload that changes the audit settings rebuilds the outputs."""

    def __init__(self, holder: Any, reactor: Any, run_in_thread: RunInThread | None = None,
                 publisher: LogPublisher = globalLogPublisher) -> None:
        self.holder = holder
        self.reactor = reactor
        self.publisher = publisher
        self.run_in_thread: RunInThread = run_in_thread or self._thread
        self.applied: Any = None
        self.audit: AuditConfig = AuditConfig()
        self.sinks: dict[tuple[Output, float | None], Sink] = {}
        self.chains: dict[str, Chain] = {}
        self.builder = RecordBuilder(Scrubber(()), None)
        self.stopped = False
        self.failed = False
        self._from_global = _AccessOnly(self)

    def _thread(self, work: Callable[[], Any]) -> defer.Deferred[Any]:
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), work)

    def start(self) -> AuditTrail:
        self._reconfigure(self.holder.current.config, strict=True)
        # Security events come whole from ccproxy.events (the daemon log only gets a rate-limited
        # share of them); access lines from the site's own publisher, or the global one.
        events.add_observer(self)
        self.publisher.addObserver(self._from_global)
        ACCESS_PUBLISHER.addObserver(self)
        return self

    def stop(self) -> defer.Deferred[Any]:
        self.stopped = True
        events.remove_observer(self)
        self.publisher.removeObserver(self._from_global)
        ACCESS_PUBLISHER.removeObserver(self)
        self._save_chain_heads()
        waits = [defer.maybeDeferred(sink.stop) for sink in self.sinks.values()]
        self.sinks = {}
        return defer.DeferredList(waits, consumeErrors=True)

    def __call__(self, event: dict[str, Any]) -> None:
        name = event.get("ccproxy_event")
        if name is None and event.get("log_namespace") != ACCESS_NAMESPACE:
            return
        if threadable.ioThread is not None and not threadable.isInIOThread():
            self.reactor.callFromThread(self, event)  # outputs are only touched on the reactor thread
            return
        if self.stopped:
            return
        config = self.holder.current.config
        if config is not self.applied:
            self._reconfigure(config)
        if not self.audit.enabled:
            return
        if name is not None:
            if name in self.audit.events:
                self._record("audit", lambda now: self.builder.security(event, now))
        else:
            self._record("access", lambda now: self.builder.access(event, now))

    def _record(self, stream: str, build: Callable[[float], dict[str, Any]]) -> None:
        targets = [(spec, sink) for (spec, _), sink in self.sinks.items() if spec.records == stream]
        if not targets:
            return
        now = self.reactor.seconds()
        record = build(now)
        line = self.chains[stream].seal(record)
        for _, sink in targets:
            if isinstance(sink, FileSink):
                sink.write(line, now)
            else:
                sink.write(record, line, now)

    def _reconfigure(self, config: Any, strict: bool = False) -> None:
        """Apply a config; an output that cannot open fails the start, but not a running daemon's reload."""
        self.applied = config
        audit: AuditConfig = config.audit
        anonymizer = None
        if audit.anonymize_logs:
            ip_key = audit.anonymize_key.reveal().encode() if audit.anonymize_key else b""
            anonymizer = Anonymizer(audit.anonymize_method, ip_key)
        self.builder = RecordBuilder(Scrubber(config_secrets(config)), anonymizer)
        if audit == self.audit and not self.failed:
            return
        self.audit, self.failed = audit, False
        wanted = {(spec, audit.data_retention) for spec in audit.outputs} if audit.enabled else set()
        for old in list(self.sinks):
            if old not in wanted:
                self.sinks.pop(old).stop()
        for spec, retention in sorted(wanted - set(self.sinks), key=lambda k: audit.outputs.index(k[0])):
            try:
                self.sinks[(spec, retention)] = self._sink(spec, retention)
            except OSError as e:
                if strict:
                    raise
                self.failed = True
                log.critical("audit output {output} could not be opened after a reload: {error}; "
                             "it writes nothing until fixed and reloaded", output=_describe(spec), error=e)
        chain_key = audit.hmac_key.reveal().encode() if audit.hmac_key else None
        for stream in ("audit", "access"):
            self.chains[stream] = self._chain(stream, chain_key)

    def _sink(self, spec: Output, retention: float | None) -> Sink:
        sink: Sink
        if isinstance(spec, FileOutput):
            sink = FileSink(spec, self.reactor, self.run_in_thread, retention, _report_loss)
        else:
            assert isinstance(spec, SyslogSpec)
            sink = SyslogSink(spec, self.reactor, _report_loss)
        sink.start()
        return sink

    def _chain(self, stream: str, key: bytes | None) -> Chain:
        """Carry on the chain: from this process's last record, or from the newest one on disk."""
        current = self.chains.get(stream)
        if current is not None:
            return Chain(key, current.seq, current.last_hash)
        last: Any = None
        files = [s for s in self.audit.outputs if isinstance(s, FileOutput) and s.records == stream]
        if files:
            last = resume_point(files[0].path)
        else:  # syslog outputs only: the head saved beside the spool at the last stop
            for spec in self.audit.outputs:
                if isinstance(spec, SyslogSpec) and spec.records == stream and last is None:
                    last = _read_json(spec.spool_path + ".chain")
        if isinstance(last, dict) and isinstance(last.get("seq"), int) and isinstance(last.get("hash"), str):
            return Chain(key, last["seq"], last["hash"])
        return Chain(key, 0, GENESIS)

    def _save_chain_heads(self) -> None:
        for spec in self.audit.outputs if self.audit.enabled else ():
            chain = self.chains.get(spec.records)
            if isinstance(spec, SyslogSpec) and chain is not None and chain.seq:
                path = spec.spool_path + ".chain"
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
                    with os.fdopen(fd, "w") as f:
                        json.dump({"seq": chain.seq, "hash": chain.last_hash}, f)
                except OSError as e:
                    log.error("audit chain head {path} not saved: {error}", path=path, error=e.strerror)


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _describe(spec: Output) -> str:
    if isinstance(spec, FileOutput):
        return f"file {spec.path}"
    return f"syslog {spec.protocol} {spec.host}:{spec.port}"


def _report_loss(count: int, output: str) -> None:
    reason = "write failed" if output.startswith("file ") else "receiver away and its queue and spool are full"
    events.emit("audit_records_lost", "error", count=count, output=output, reason=reason)


@implementer(ILogObserver)
class _AccessOnly:
    """The trail's view of the global log: access lines only (security events come whole, directly)."""

    def __init__(self, trail: AuditTrail) -> None:
        self.trail = trail

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("ccproxy_event") is None:
            self.trail(event)
