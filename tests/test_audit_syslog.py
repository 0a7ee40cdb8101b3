"""The syslog output in memory: RFC 5424 + octet counting, queue, spool, loss reports, resend, restart."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from ccproxy.audit._record import Chain, RecordBuilder, encode
from ccproxy.audit._scrub import Scrubber
from ccproxy.audit._syslog import SyslogSink
from ccproxy.config.audit import FACILITIES, SyslogOutput

HEADER = re.compile(rb"^<(\d+)>1 (\S+) (\S+) (\S+) (\d+) (\S+) - (\{.*\})$")


class Receiver:
    """Plays the network: accepts the sink's TCP connections on demand, keeps what each one got."""

    def __init__(self, reactor: MemoryReactorClock) -> None:
        self.reactor = reactor
        self.taken = 0
        self.received = b""
        self.transport: StringTransport | None = None
        self.protocol: Any = None

    def accept(self) -> None:
        _, _, factory, _, _ = self.reactor.tcpClients[-1]
        self.taken = len(self.reactor.tcpClients)
        self.protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 514))
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def collect(self) -> None:
        if self.transport is not None:
            self.received += self.transport.value()
            self.transport.clear()

    def drop(self, reason: Exception) -> None:
        self.collect()
        self.protocol.connectionLost(Failure(reason))
        self.transport = None

    def messages(self) -> list[bytes]:
        """Undo RFC 6587 octet counting."""
        self.collect()
        out, data = [], self.received
        while data:
            length, _, rest = data.partition(b" ")
            out.append(rest[: int(length)])
            data = rest[int(length):]
        return out

    def seqs(self) -> list[int]:
        import json

        return [json.loads(HEADER.match(m).group(7))["seq"] for m in self.messages()]  # type: ignore[union-attr]


class Source:
    def __init__(self) -> None:
        self.chain = Chain(None)
        self.builder = RecordBuilder(Scrubber(()), None)

    def feed(self, sink: SyslogSink, count: int, now: float = 0.0, severity: str = "warning") -> None:
        for i in range(count):
            event = {"ccproxy_event": "authentication_failure", "severity": severity, "n": i}
            record = self.builder.security(event, now)
            line = self.chain.seal(record)
            assert line == encode(record)
            sink.write(record, line, now)


@pytest.fixture
def lost() -> Iterator[list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []

    def observer(event: dict[str, Any]) -> None:
        if event.get("ccproxy_event") == "audit_records_lost":
            seen.append(event)

    globalLogPublisher.addObserver(observer)
    yield seen
    globalLogPublisher.removeObserver(observer)


def _sink(tmp: Path, reactor: MemoryReactorClock, **extra: Any) -> SyslogSink:
    spec = SyslogOutput(host="127.0.0.1", port=514, protocol="tcp", spool_path=str(tmp / "spool"), **extra)
    from ccproxy.audit._trail import _report_loss

    sink = SyslogSink(spec, reactor, _report_loss)
    sink.start()
    return sink


def test_rfc5424_with_octet_counting(tmp_path: Path) -> None:
    reactor = MemoryReactorClock()
    sink = _sink(tmp_path, reactor, facility=FACILITIES["local3"], app_name="ccp-test")
    net = Receiver(reactor)
    net.accept()
    Source().feed(sink, 3)
    messages = net.messages()
    assert len(messages) == 3
    for message in messages:
        match = HEADER.match(message)
        assert match is not None, message
        assert int(match.group(1)) == 19 * 8 + 4  # local3.warning
        assert match.group(2) == b"1970-01-01T00:00:00.000Z"
        assert match.group(4) == b"ccp-test" and match.group(6) == b"authentication_failure"
    assert net.seqs() == [1, 2, 3]
    sink.stop()


def test_records_wait_for_the_receiver_then_go_in_order(tmp_path: Path) -> None:
    reactor = MemoryReactorClock()
    sink = _sink(tmp_path, reactor, queue_size=4)
    net = Receiver(reactor)
    Source().feed(sink, 10)  # receiver not there yet: 4 in memory, 6 spooled
    assert len(sink.queue) == 4 and (tmp_path / "spool").read_bytes().count(b"\n") == 6
    net.accept()
    assert net.seqs() == list(range(1, 11))
    assert (tmp_path / "spool").read_bytes() == b""
    sink.stop()


def test_reconnects_and_resends_what_may_have_been_lost_in_flight(tmp_path: Path) -> None:
    reactor = MemoryReactorClock()
    sink = _sink(tmp_path, reactor)
    net = Receiver(reactor)
    source = Source()
    net.accept()
    source.feed(sink, 3, now=0.0)
    reactor.advance(5.0)
    source.feed(sink, 2, now=5.0)  # sent just before the connection drops
    net.drop(ConnectionLost())
    source.feed(sink, 3, now=5.5)  # while down
    reactor.advance(2.0)  # ClientService retries (0.25 s, plus jitter)
    assert len(reactor.tcpClients) > net.taken
    net.accept()
    seqs = net.seqs()
    assert seqs == [1, 2, 3, 4, 5, 4, 5, 6, 7, 8]  # at least once: duplicates carry their seq
    assert sorted(set(seqs)) == list(range(1, 9))
    sink.stop()


def test_backpressure_from_the_transport_pauses_sending(tmp_path: Path) -> None:
    reactor = MemoryReactorClock()
    sink = _sink(tmp_path, reactor)
    net = Receiver(reactor)
    net.accept()
    net.transport.producer.pauseProducing()  # type: ignore[union-attr]
    Source().feed(sink, 5)
    assert net.messages() == [] and len(sink.queue) == 5
    net.transport.producer.resumeProducing()  # type: ignore[union-attr]
    assert net.seqs() == [1, 2, 3, 4, 5]
    sink.stop()


def test_spool_full_loss_is_counted_and_reported(tmp_path: Path, lost: list[dict[str, Any]]) -> None:
    reactor = MemoryReactorClock()
    sink = _sink(tmp_path, reactor, queue_size=2, spool_max_size=1000)
    Source().feed(sink, 20)
    assert sink.lost > 0
    assert lost == []  # reported once per interval, not per record
    reactor.advance(10.0)
    assert len(lost) == 1 and lost[0]["count"] == sink.lost and "syslog tcp 127.0.0.1:514" in lost[0]["output"]
    kept = 2 + (tmp_path / "spool").read_bytes().count(b"\n")
    assert kept + sink.lost == 20
    sink.stop()


def test_spooled_records_survive_a_restart(tmp_path: Path) -> None:
    reactor = MemoryReactorClock()
    source = Source()
    sink = _sink(tmp_path, reactor, queue_size=3)
    source.feed(sink, 7)
    sink.stop()
    assert (tmp_path / "spool").read_bytes().count(b"\n") == 7
    reactor2 = MemoryReactorClock()
    sink2 = _sink(tmp_path, reactor2, queue_size=3)
    source.feed(sink2, 2)
    net = Receiver(reactor2)
    net.accept()
    assert net.seqs() == list(range(1, 10))
    sink2.stop()


def test_stop_with_a_clean_close_keeps_nothing_twice(tmp_path: Path) -> None:
    reactor = MemoryReactorClock()
    sink = _sink(tmp_path, reactor)
    net = Receiver(reactor)
    net.accept()
    Source().feed(sink, 3)
    d = sink.stop()
    net.drop(ConnectionDone())
    assert d.called
    assert net.seqs() == [1, 2, 3]
    assert (tmp_path / "spool").read_bytes() == b""


def test_a_partial_line_left_in_the_spool_by_a_crash_is_cut(tmp_path: Path) -> None:
    reactor = MemoryReactorClock()
    source = Source()
    sink = _sink(tmp_path, reactor, queue_size=1)
    source.feed(sink, 3)
    sink.stop()
    with open(tmp_path / "spool", "ab") as f:
        f.write(b"<36>1 2026-01-01T00:00:00.000Z host ccproxy 1 half")
    sink2 = _sink(tmp_path, reactor, queue_size=1)
    source.feed(sink2, 1)
    net = Receiver(reactor)
    net.accept()
    assert net.seqs() == [1, 2, 3, 4]
    sink2.stop()


def test_a_reload_that_changes_the_output_keeps_its_queued_records(tmp_path: Path) -> None:
    from ccproxy import events
    from ccproxy.audit import AuditTrail
    from tests.support.audit import Holder, Runtime, config, sync

    def audit(app: str) -> dict[str, Any]:
        return {"outputs": [{"type": "syslog", "protocol": "tcp", "host": "127.0.0.1", "port": 514, "app_name": app,
                             "queue_size": 2, "spool_path": str(tmp_path / "spool")}]}

    reactor = MemoryReactorClock()
    holder = Holder(config(audit("before")))
    trail = AuditTrail(holder, reactor, run_in_thread=sync).start()
    try:
        for i in range(5):
            events.emit("invalid_request", "notice", n=i)  # the receiver is away: queued and spooled
        holder.current = Runtime(config(audit("after")))
        events.emit("configuration_change", "notice", changed=["security.audit.outputs"])
        net = Receiver(reactor)
        net.accept()
        assert net.seqs() == [1, 2, 3, 4, 5, 6]
        assert all(b" after " in m for m in net.messages()[5:])
    finally:
        trail.stop()


def test_with_syslog_outputs_only_the_chain_continues_after_a_restart(tmp_path: Path) -> None:
    import json

    from ccproxy import events
    from ccproxy.audit import AuditTrail
    from tests.support.audit import Holder, config, sync

    audit = {"outputs": [{"type": "syslog", "protocol": "tcp", "host": "127.0.0.1", "port": 514,
                          "spool_path": str(tmp_path / "spool")}]}
    received = []
    for _ in range(2):
        reactor = MemoryReactorClock()
        trail = AuditTrail(Holder(config(audit)), reactor, run_in_thread=sync).start()
        net = Receiver(reactor)
        net.accept()
        try:
            events.emit("invalid_request", "notice")
            events.emit("invalid_request", "notice")
        finally:
            trail.stop()
        received += [json.loads(HEADER.match(m).group(7)) for m in net.messages()]  # type: ignore[union-attr]
    checkpoints = [r for r in received if r.get("type") == "checkpoint"]
    received = [r for r in received if r.get("type") != "checkpoint"]
    assert [r["seq"] for r in received] == [1, 2, 3, 4]
    # Each stop signs the head it reached, and the syslog receiver gets that checkpoint too.
    assert [(c["seq"], c["hash"], c["reason"]) for c in checkpoints] == [
        (2, received[1]["hash"], "shutdown"), (4, received[3]["hash"], "shutdown")]
    assert received[2]["prev"] == received[1]["hash"]


# -- datagram outputs (UDP, a Unix socket): a real kernel socket, the reactor's clock in memory


class DatagramReceiver:
    """A Unix datagram socket the sink sends to; bound on demand, read without blocking."""

    def __init__(self, path: Path) -> None:
        import socket

        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)

    def bind(self) -> DatagramReceiver:
        self.sock.bind(str(self.path))
        return self

    def read(self) -> list[bytes]:
        got = []
        while True:
            try:
                got.append(self.sock.recv(1 << 20))
            except BlockingIOError:
                return got

    def seqs(self, messages: list[bytes]) -> list[int]:
        import json

        # The local socket speaks the syslog(3) format: the record is the JSON after the tag.
        return [json.loads(m[m.index(b"{"):])["seq"] for m in messages]

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)


@pytest.fixture
def log_text() -> Iterator[list[str]]:
    from twisted.logger import formatEvent

    seen: list[str] = []

    def observer(event: dict[str, Any]) -> None:
        if event.get("log_namespace", "").startswith("ccproxy.audit"):
            seen.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)
    yield seen
    globalLogPublisher.removeObserver(observer)


def _unix_sink(tmp: Path, reactor: Any, **extra: Any) -> SyslogSink:
    from ccproxy.audit._trail import _report_loss

    spec = SyslogOutput(host=str(tmp / "log.sock"), port=0, protocol="unix", spool_path=str(tmp / "spool"), **extra)
    sink = SyslogSink(spec, reactor, _report_loss)
    sink.start()
    return sink


def test_a_unix_receiver_that_is_not_there_yet_gets_everything_once_it_is(tmp_path: Path,
                                                                          log_text: list[str]) -> None:
    reactor = MemoryReactorClock()
    sink = _unix_sink(tmp_path, reactor)
    Source().feed(sink, 3)
    assert len(sink.queue) == 3
    reactor.advance(1.0)
    reactor.advance(1.0)  # retried every second, warned once per outage
    assert len([line for line in log_text if "retrying every 1.0s" in line]) == 1
    receiver = DatagramReceiver(tmp_path / "log.sock").bind()
    try:
        reactor.advance(1.0)
        assert receiver.seqs(receiver.read()) == [1, 2, 3]
        assert any("sending again" in line for line in log_text)
        # The receiver goes away: records wait again, and go out once it is back.
        receiver.close()
        Source().feed(sink, 2)
        assert sink.link.ready() is False  # type: ignore[attr-defined]
        receiver = DatagramReceiver(tmp_path / "log.sock").bind()
        reactor.advance(1.0)
        assert receiver.seqs(receiver.read()) == [1, 2]  # a new Source: its own sequence
    finally:
        sink.stop()
        receiver.close()


def test_a_datagram_too_large_is_dropped_and_counted(tmp_path: Path, log_text: list[str]) -> None:
    reactor = MemoryReactorClock()
    receiver = DatagramReceiver(tmp_path / "log.sock").bind()
    sink = _unix_sink(tmp_path, reactor)
    try:
        record = {"timestamp": "1970-01-01T00:00:00.000Z", "severity": "info", "event": "big"}
        sink.write(record, b'{"x": "' + b"x" * (4 << 20) + b'"}', 0.0)  # past any socket buffer
        Source().feed(sink, 1)
        assert sink.lost == 1
        assert receiver.seqs(receiver.read()) == [1]  # the next record still goes out
        assert any("too large for a datagram" in line for line in log_text)
    finally:
        sink.stop()
        receiver.close()


def test_a_full_datagram_buffer_parks_the_sender_and_loses_nothing(tmp_path: Path) -> None:
    reactor = MemoryReactorClock()
    receiver = DatagramReceiver(tmp_path / "log.sock").bind()
    sink = _unix_sink(tmp_path, reactor, queue_size=100_000)
    try:
        Source().feed(sink, 3000)  # more than a Unix datagram queue holds unread
        assert sink.queue, "the kernel took every datagram at once: nothing was parked"
        got: list[bytes] = []
        for _ in range(10_000):
            got += receiver.read()
            if len(got) == 3000:
                break
            reactor.advance(0.01)  # the parked socket is tried again shortly
        assert receiver.seqs(got) == list(range(1, 3001))
        assert sink.lost == 0
    finally:
        sink.stop()
        receiver.close()


def test_a_udp_host_name_is_resolved_and_a_failed_lookup_retried(tmp_path: Path, log_text: list[str]) -> None:
    import socket

    from twisted.internet import defer
    from twisted.internet.error import DNSLookupError

    from ccproxy.audit._trail import _report_loss

    answers: list[Any] = [DNSLookupError("no such host"), "127.0.0.1"]

    class Resolving(MemoryReactorClock):
        def resolve(self, name: str) -> defer.Deferred[str]:
            assert name == "syslog.example"
            answer = answers.pop(0)
            return defer.fail(answer) if isinstance(answer, Exception) else defer.succeed(answer)

    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(5)
    reactor = Resolving()
    spec = SyslogOutput(host="syslog.example", port=receiver.getsockname()[1], protocol="udp",
                        spool_path=str(tmp_path / "spool"))
    sink = SyslogSink(spec, reactor, _report_loss)
    sink.start()
    try:
        Source().feed(sink, 1)
        assert any("no such host" in line for line in log_text)
        reactor.advance(5.0)  # looked up again
        assert answers == []
        assert HEADER.match(receiver.recv(65536)) is not None
    finally:
        sink.stop()
        receiver.close()
