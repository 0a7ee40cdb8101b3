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
from ccproxy.audit import _checkpoint
from ccproxy.audit._file import FileSink, RunInThread, first_seq, resume_point
from ccproxy.audit._record import GENESIS, Chain, RecordBuilder, parse_line
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
        # The oldest seq of each stream the files must still hold (moved on only by our own retention).
        self.first: dict[str, int] = {}
        self.signer = _checkpoint.Signer(_checkpoint.DIGEST)
        self._checkpointed: dict[str, tuple[int, int]] = {}
        self._checkpoint_call: Any = None
        self._pending: list[tuple[str, str, str, dict[str, Any]]] = []
        self.privacy: Any = None
        self.sealer: Any = None  # with right_to_deletion: seals each record's personal fields
        self.at_rest: Any = None  # with encryption_at_rest: encrypts each line of files and spools
        self.decode: Any = parse_line
        self._privacy_call: Any = None
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
        self._emit_pending()
        return self

    def stop(self) -> defer.Deferred[Any]:
        if self.audit.enabled and not self.stopped:
            self.checkpoint("shutdown")
        self.stopped = True
        for call in (self._checkpoint_call, self._privacy_call):
            if call is not None and call.active():
                call.cancel()
        self._checkpoint_call = self._privacy_call = None
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
            self._emit_pending()
        if not self.audit.enabled:
            return
        if name is not None:
            if name in self.audit.events:
                self._record("audit", lambda now: self.builder.security(event, now))
        else:
            self._record("access", lambda now: self.builder.access(event, now))

    def checkpoint(self, reason: str) -> list[dict[str, Any]]:
        """Sign each chain's head (once its records are written) to the checkpoint files and syslog.

        `reason` is interval, rotation, shutdown or request; an interval checkpoint is skipped when
        nothing changed since the last one.
        """
        files = [(sink.spec, sink) for sink in self.sinks.values() if isinstance(sink, FileSink)]
        syslogs = [sink for sink in self.sinks.values() if isinstance(sink, SyslogSink)]
        for _, sink in files:
            sink.flush()  # a checkpoint covers what is in the files, not what waits in a buffer
        now = self.reactor.seconds()
        made = []
        for stream, chain in self.chains.items():
            paths = [spec.checkpoint_path for spec, _ in files if spec.records == stream]
            if chain.seq == 0 or not (paths or syslogs):
                continue
            first = self.first.get(stream, 1)
            if reason == "interval" and self._checkpointed.get(stream) == (chain.seq, first):
                continue
            cp = _checkpoint.make(stream, chain.seq, chain.last_hash, first, now, self.signer, reason)
            self._checkpointed[stream] = (chain.seq, first)
            for path in paths:
                try:
                    _checkpoint.append(path, cp)
                except OSError as e:
                    log.error("audit checkpoint file {path} not written: {error}", path=path, error=e.strerror)
            line = _checkpoint.line(cp)
            header = {"timestamp": cp["time"], "event": "audit_checkpoint", "severity": "info"}
            for syslog in syslogs:
                syslog.write(header, line, now)
            made.append(cp)
        return made

    def _checkpoint_tick(self) -> None:
        self._checkpoint_call = self.reactor.callLater(self.audit.checkpoint_interval, self._checkpoint_tick)
        self.checkpoint("interval")

    def _rotated(self, stream: str, path: str, removed: list[str]) -> None:
        if removed:  # our own retention moved the start of the chain: the next checkpoint says so
            oldest = first_seq(path, self.decode)
            if oldest is not None:
                self.first[stream] = oldest
        self.reactor.callLater(0, self._checkpoint_after_rotation)

    def _checkpoint_after_rotation(self) -> None:
        if not self.stopped:
            self.checkpoint("rotation")

    def _notice(self, stream: str, name: str, severity: str, fields: dict[str, Any]) -> None:
        """Something the trail found wrong with its own evidence: recorded in the stream it concerns.

        Security events reach the audit chain; a finding about the access chain is also sealed into
        that chain, so its files explain themselves to verify.
        """
        if self.stopped:
            return
        if stream == "access":
            event = {"ccproxy_event": name, "severity": severity, **fields}
            self._record("access", lambda now: self.builder.security(event, now))
        events.emit(name, severity, stream=stream, **fields)

    def _emit_pending(self) -> None:
        pending, self._pending = self._pending, []
        for stream, name, severity, fields in pending:
            self._notice(stream, name, severity, fields)

    def _record(self, stream: str, build: Callable[[float], dict[str, Any]]) -> None:
        targets = [(spec, sink) for (spec, _), sink in self.sinks.items() if spec.records == stream]
        if not targets:
            return
        now = self.reactor.seconds()
        record = build(now)
        if self.sealer is not None:
            self.sealer.seal(record)
        line = self.chains[stream].seal(record)
        stored = self.at_rest.seal(line) if self.at_rest is not None else line
        for _, sink in targets:
            if isinstance(sink, FileSink):
                sink.write(stored, now)
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
        self._configure_privacy(config.privacy, strict)
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
        try:
            self.signer = _checkpoint.signer(audit.signing_key, chain_key)
        except (OSError, ValueError) as e:
            if strict:
                raise
            log.critical("audit checkpoint key unusable after a reload ({error}): checkpoints are unsigned",
                         error=str(e))
            self.signer = _checkpoint.Signer(_checkpoint.DIGEST)
        for stream in ("audit", "access"):
            self.chains[stream] = self._chain(stream, chain_key)
        for (spec, _), sink in self.sinks.items():
            if isinstance(sink, FileSink) and sink.damage is not None:
                self._pending.append((spec.records, "audit_file_damaged", "error", sink.damage))
                sink.damage = None
        if self._checkpoint_call is not None and self._checkpoint_call.active():
            self._checkpoint_call.cancel()
        self._checkpoint_call = None
        if audit.enabled:
            self._checkpoint_call = self.reactor.callLater(audit.checkpoint_interval, self._checkpoint_tick)

    def _configure_privacy(self, privacy: Any, strict: bool) -> None:
        """Open the key store the config names (once per change of its settings)."""
        if privacy == self.privacy:
            return
        sealer = at_rest = None
        if privacy.right_to_deletion or privacy.encryption_at_rest:
            # The key store and its ciphers are loaded only by a config that uses them.
            from ccproxy.audit.privacy import AtRest, open_store
            from ccproxy.audit.privacy._seal import Sealer

            try:
                store = open_store(privacy)
                sealer = Sealer(store) if privacy.right_to_deletion else None
                at_rest = AtRest(store.at_rest_key() or b"") if privacy.encryption_at_rest else None
            except (OSError, ValueError) as e:
                if strict:
                    raise
                # Keep the store in use: writing personal data in clear is not an option.
                log.critical("privacy key store {path} unusable after a reload ({error}): the previous key "
                             "store stays in use", path=privacy.key_store, error=str(e))
                return
        self.privacy, self.sealer, self.at_rest = privacy, sealer, at_rest
        self.decode = at_rest.decode if at_rest is not None else parse_line
        for sink in self.sinks.values():
            if isinstance(sink, SyslogSink):
                sink.spool.codec = at_rest
        if self._privacy_call is not None and self._privacy_call.active():
            self._privacy_call.cancel()
        self._privacy_call = self.reactor.callLater(0, self._privacy_tick) if sealer is not None else None

    def _privacy_tick(self) -> None:
        """Once a second: drop cached keys after an erasure, and record the erasures done since."""
        self._privacy_call = self.reactor.callLater(1.0, self._privacy_tick)
        assert self.sealer is not None
        store = self.sealer.store
        new = store.take_unsynced()
        if new:
            self.run_in_thread(lambda: store.sync_new(new)).addErrback(
                lambda f: log.failure("privacy key store sync", f))
        try:
            if store.changed():
                self.sealer.forget_cached()
            erasures = store.take_erasures()
        except OSError as e:
            log.error("privacy key store {path}: {error}", path=store.dir, error=e.strerror)
            return
        for erasure in erasures:
            events.emit("privacy_subject_erased", "notice", subject=erasure.get("subject"),
                        kind=erasure.get("kind"), erased_at=erasure.get("time"), had_key=erasure.get("had_key"),
                        reason="the subject's key was destroyed: its personal data in every record is unreadable")

    def _sink(self, spec: Output, retention: float | None) -> Sink:
        sink: Sink
        if isinstance(spec, FileOutput):
            stream, path = spec.records, spec.path
            sink = FileSink(spec, self.reactor, self.run_in_thread, retention, _report_loss,
                            notice=lambda name, severity, fields: self._notice(stream, name, severity, fields),
                            rotated=lambda removed: self._rotated(stream, path, removed), decode=self.decode)
        else:
            assert isinstance(spec, SyslogSpec)
            sink = SyslogSink(spec, self.reactor, _report_loss)
            sink.spool.codec = self.at_rest
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
            last = resume_point(files[0].path, self.decode)
        else:  # syslog outputs only: the head saved beside the spool at the last stop
            for spec in self.audit.outputs:
                if isinstance(spec, SyslogSpec) and spec.records == stream and last is None:
                    last = _read_json(spec.spool_path + ".chain")
        seq, head = 0, GENESIS
        if isinstance(last, dict) and isinstance(last.get("seq"), int) and isinstance(last.get("hash"), str):
            seq, head = last["seq"], last["hash"]
        if files:
            seq, head = self._against_checkpoint(stream, files[0], seq, head)
        return Chain(key, seq, head)

    def _against_checkpoint(self, stream: str, spec: FileOutput, seq: int, head: str) -> tuple[int, str]:
        """Compare what the files hold with the last checkpoint; carry on from the checkpoint's head.

        Records cut from the end while the daemon was stopped would otherwise be papered over: the
        next record would follow the last one left. Carrying on from the checkpoint keeps the gap in
        the chain, where verify finds it, and a notice says what was found.
        """
        cp = _checkpoint.last(spec.checkpoint_path, stream)
        oldest = first_seq(spec.path, self.decode)
        if cp is None:
            self.first[stream] = oldest if oldest is not None else seq + 1
            return seq, head
        self.first[stream] = cp["first"]
        self._checkpointed[stream] = (cp["seq"], cp["first"])
        if oldest is not None and oldest > cp["first"]:
            self._pending.append((stream, "audit_records_missing", "critical", {
                "file": spec.path, "missing_from": cp["first"], "missing_to": oldest - 1,
                "reason": f"records seq {cp['first']} to {oldest - 1} are missing: the oldest files were removed "
                          f"outside retention (the last checkpoint, {cp['time']}, still counted them)"}))
        if cp["seq"] > seq:
            self._pending.append((stream, "audit_records_missing", "critical", {
                "file": spec.path, "missing_from": seq + 1, "missing_to": cp["seq"],
                "reason": f"records after seq {seq} are missing: the last checkpoint ({cp['time']}) saw seq "
                          f"{cp['seq']}; the file is older than the last checkpoint"}))
            return cp["seq"], cp["hash"]
        if cp["seq"] == seq and cp["hash"] != head:
            self._pending.append((stream, "audit_records_missing", "critical", {
                "file": spec.path, "missing_from": seq, "missing_to": seq,
                "reason": f"record seq {seq} does not match the last checkpoint ({cp['time']}): it was rewritten"}))
            return cp["seq"], cp["hash"]
        return seq, head

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
