"""The syslog output: RFC 5424 messages over TCP (RFC 6587 octet counting) or UDP; over the local
Unix socket (`/dev/log`) the traditional local format that syslog(3) writes and the system's syslog
daemon parses there (`<PRI>Mmm dd hh:mm:ss TAG[PID]: MSG`, RFC 3164 style).

A receiver that goes away is logged once when it goes and once when it is back, however many
reconnection attempts lie between.

Nothing is lost while the receiver is away: messages wait in a bounded memory queue, then in a
bounded spool file, and go out in order when it is back (also after a restart). What even the spool
cannot hold is counted and reported through `report_loss`.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import random
import socket
import time
from collections import deque
from typing import Any

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger, LogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from ccproxy.audit._loss import LossCounter, Report
from ccproxy.config.audit import SyslogOutput

log = Logger(namespace="ccproxy.audit")

SEVERITIES = {"emergency": 0, "alert": 1, "critical": 2, "error": 3, "warning": 4, "notice": 5, "info": 6,
              "debug": 7}
# Messages written just before a TCP connection dropped may never have reached the receiver:
# they are sent again after a reconnect (at least once; `seq` tells duplicates apart).
RESEND_WINDOW = 2.0
_RESEND_MAX = 10000
_REFILL_BATCH = 1000
_CLOSED = Failure(ConnectionError("connection closed"))


_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def format_local(record: dict[str, Any], body: bytes, spec: SyslogOutput, pid: int, now: float) -> bytes:
    """The local socket's format, as syslog(3) writes it: <PRI>Mmm dd hh:mm:ss TAG[PID]: MSG (local time).

    The month is English whatever the locale, the day padded with a space, as RFC 3164 has it.
    """
    pri = spec.facility * 8 + SEVERITIES.get(str(record.get("severity")), 6)
    t = time.localtime(now)
    stamp = f"{_MONTHS[t.tm_mon - 1]} {t.tm_mday:2d} {t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"
    return f"<{pri}>{stamp} {spec.app_name}[{pid}]: ".encode("ascii") + body.rstrip(b"\n")


def format_message(record: dict[str, Any], body: bytes, spec: SyslogOutput, hostname: str, pid: int) -> bytes:
    """An RFC 5424 message: <PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - MSG."""
    pri = spec.facility * 8 + SEVERITIES.get(str(record.get("severity")), 6)
    msgid = "".join(c for c in str(record.get("event") or "-") if 33 <= ord(c) <= 126)[:32] or "-"
    head = f"<{pri}>1 {record['timestamp']} {hostname} {spec.app_name} {pid} {msgid} - "
    return head.encode("ascii") + body.rstrip(b"\n")


class Spool:
    """An append-only file of pending messages, one per line, read back from an offset.

    With encryption at rest, `codec` (seal, open) encrypts each line as it is written and decrypts
    it as it is read; a line that cannot be decrypted is dropped and counted as lost.
    """

    def __init__(self, path: str, limit: int) -> None:
        self.codec: Any = None
        self.undecryptable = 0
        self.path = path
        self.limit = limit
        self.offset = 0
        self.size = 0
        self.fd = -1
        try:
            os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
            self.fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            os.fchmod(self.fd, 0o600)
            self.size = os.fstat(self.fd).st_size
            self._drop_partial_tail()
        except OSError as e:
            log.error("audit spool {path} unusable ({error}): only the memory queue will hold records",
                      path=path, error=e.strerror)

    def _drop_partial_tail(self) -> None:
        """A crash mid-append leaves half a line: cut it, or it would glue onto the next record."""
        if self.size and os.pread(self.fd, 1, self.size - 1) != b"\n":
            tail = os.pread(self.fd, min(self.size, 1024 * 1024), max(0, self.size - 1024 * 1024))
            keep = self.size - len(tail) + tail.rfind(b"\n") + 1
            os.ftruncate(self.fd, keep)
            log.error("audit spool {path}: a partly written record at its end was dropped", path=self.path)
            self.size = keep

    @property
    def pending(self) -> bool:
        return self.size > self.offset

    def _line(self, message: bytes) -> bytes:
        return self.codec.seal(message) if self.codec is not None else message + b"\n"

    def _open(self, lines: list[bytes]) -> list[bytes]:
        if self.codec is None:
            return lines
        out = []
        for line in lines:
            try:
                out.append(self.codec.open(line))
            except ValueError:
                self.undecryptable += 1
        return out

    def append(self, message: bytes) -> bool:
        line = self._line(message)
        if self.fd < 0 or self.size - self.offset + len(line) > self.limit:
            return False
        try:
            os.write(self.fd, line)
        except OSError:
            return False
        self.size += len(line)
        return True

    def read(self, count: int) -> list[bytes]:
        if not self.pending:
            return []
        data = os.pread(self.fd, min(self.size - self.offset, 1024 * 1024), self.offset)
        lines = data.split(b"\n")[:-1][:count]
        self.offset += sum(len(line) + 1 for line in lines)
        if self.offset >= self.size:
            os.ftruncate(self.fd, 0)
            self.offset = self.size = 0
        return self._open([line for line in lines if line])

    def save(self, first: list[bytes]) -> None:
        """At shutdown: rewrite the spool as `first` followed by what was not read yet."""
        if self.fd < 0:
            if first:
                log.error("audit spool {path} unusable: {count} records lost at shutdown",
                          path=self.path, count=len(first))
            return
        rest = os.pread(self.fd, self.size - self.offset, self.offset) if self.pending else b""
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, b"".join(self._line(m) for m in first) + rest)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        os.close(self.fd)
        self.fd = -1


class SyslogSink:
    def __init__(self, spec: SyslogOutput, reactor: Any, report_loss: Report) -> None:
        self.spec = spec
        self.reactor = reactor
        self.report_loss = report_loss
        self.hostname = socket.gethostname() or "-"
        self.pid = os.getpid()
        self.queue: deque[bytes] = deque()
        self._headers: dict[tuple[Any, Any], tuple[bytes, bytes]] = {}
        self.sent: deque[tuple[float, bytes]] = deque()
        self.spool = Spool(spec.spool_path, spec.spool_max_size)
        self.link: _Link = _TCPLink(self) if spec.protocol == "tcp" else _DatagramLink(self)
        self.losses = LossCounter(reactor, self.name, report_loss)
        self.stopping = False

    @property
    def name(self) -> str:
        where = self.spec.host if self.spec.protocol == "unix" else f"{self.spec.host}:{self.spec.port}"
        return f"syslog {self.spec.protocol} {where}"

    def start(self) -> None:
        self.link.start()

    def write(self, record: dict[str, Any], body: bytes, now: float) -> None:
        if self.spec.protocol == "unix":
            message = format_local(record, body, self.spec, self.pid, now)
        else:
            message = self._rfc5424(record, body)
        self._enqueue(message)

    def _rfc5424(self, record: dict[str, Any], body: bytes) -> bytes:
        key = (record.get("severity"), record.get("event"))
        parts = self._headers.get(key)
        if parts is None:  # the header differs only by its timestamp for a given event and severity
            sample = format_message({**record, "timestamp": "\0"}, b"", self.spec, self.hostname, self.pid)
            before, _, after = sample.partition(b"\0")
            parts = self._headers[key] = (before, after)
        return parts[0] + str(record["timestamp"]).encode("ascii") + parts[1] + body.rstrip(b"\n")

    def _enqueue(self, message: bytes) -> None:
        if self.spool.pending or len(self.queue) >= self.spec.queue_size:
            if not self.spool.append(message):
                self.losses.add(1)
        else:
            self.queue.append(message)
        self.pump()

    def pump(self) -> None:
        if self.stopping:
            return
        now = self.reactor.seconds()
        while self.link.ready():
            if not self.queue:
                self.queue.extend(self.spool.read(_REFILL_BATCH))
                if self.spool.undecryptable:
                    self.losses.add(self.spool.undecryptable)
                    self.spool.undecryptable = 0
                if not self.queue:
                    break
            message = self.queue.popleft()
            if not self.link.send(message):
                self.queue.appendleft(message)
                break
            self.sent.append((now, message))
        while self.sent and (len(self.sent) > _RESEND_MAX or self.sent[0][0] < now - RESEND_WINDOW):
            self.sent.popleft()

    def link_lost(self) -> None:
        """The connection dropped: what went out just before may be lost in flight, send it again."""
        if self.stopping:
            return
        self.queue.extendleft(message for _, message in reversed(self.sent))
        self.sent.clear()

    def stop(self) -> defer.Deferred[None]:
        """Save what is unsent at once (a reload may open the same spool next), then close the link."""
        self.stopping = True
        self.losses.stop()
        self.spool.save(list(self.queue))
        self.queue.clear()
        return self.link.stop()

    @property
    def lost(self) -> int:
        return self.losses.lost


class _Link:
    def start(self) -> None:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def send(self, message: bytes) -> bool:
        raise NotImplementedError

    def stop(self) -> defer.Deferred[None]:
        raise NotImplementedError


@implementer(IPushProducer)
class _SyslogProtocol(Protocol):
    """Sends only; the transport's push-producer signals stop us filling its buffer without bound."""

    def __init__(self, sink: SyslogSink) -> None:
        self.sink = sink
        self.paused = False
        self.lost = defer.Deferred[None]()

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.registerProducer(self, True)
        link = self.sink.link
        assert isinstance(link, _TCPLink)
        link.protocol = self
        link.up()
        self.sink.pump()

    def dataReceived(self, data: bytes) -> None:
        pass  # a syslog receiver has nothing to say

    def connectionLost(self, reason: Failure = _CLOSED) -> None:
        link = self.sink.link
        if isinstance(link, _TCPLink) and link.protocol is self:
            link.protocol = None
            if not self.sink.stopping:
                link.down(reason.getErrorMessage())
        self.sink.link_lost()
        self.lost.callback(None)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self.sink.pump()

    def stopProducing(self) -> None:
        self.paused = True


class _QuietClientService(ClientService):
    """Without a log line per attempt ("Scheduling retry ..."): `_TCPLink` says what matters, once."""

    _log = Logger(observer=LogPublisher())


@implementer(IStreamClientEndpoint)
class _WatchedEndpoint:
    """Tells the link about each failed connection attempt."""

    def __init__(self, endpoint: IStreamClientEndpoint, link: _TCPLink) -> None:
        self.endpoint = endpoint
        self.link = link

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        def failed(failure: Failure) -> Failure:
            self.link.down(failure.getErrorMessage())
            return failure

        return self.endpoint.connect(factory).addErrback(failed)


class _TCPLink(_Link):
    def __init__(self, sink: SyslogSink) -> None:
        self.sink = sink
        self.protocol: _SyslogProtocol | None = None
        self.state = "starting"  # then "up" or "down"; each change is logged once
        self.failures = 0
        endpoint = _endpoint(sink.reactor, sink.spec.host, sink.spec.port)
        if sink.spec.tls:
            endpoint = _tls(endpoint, sink.spec)
        endpoint = _WatchedEndpoint(endpoint, self)
        factory = Factory.forProtocol(lambda: _SyslogProtocol(sink))
        factory.noisy = False  # no "Starting factory" / "Stopping factory" per connection
        retry = backoffPolicy(initialDelay=0.25, maxDelay=5.0, jitter=_jitter)
        self.service = _QuietClientService(endpoint, factory, retryPolicy=retry, clock=sink.reactor)

    def up(self) -> None:
        if self.state == "down":
            log.info("audit {name}: receiver back after {failures} failed attempt(s); sending what waited",
                     name=self.sink.name, failures=self.failures)
        elif self.state == "starting":
            log.info("audit {name}: connected", name=self.sink.name)
        self.state, self.failures = "up", 0

    def down(self, error: str) -> None:
        if self.sink.stopping:
            return
        self.failures += 1
        if self.state != "down":
            log.warn("audit {name}: receiver unreachable ({error}); records wait in the queue and spool, "
                     "reconnecting", name=self.sink.name, error=error)
        self.state = "down"

    def start(self) -> None:
        self.service.startService()

    def ready(self) -> bool:
        return self.protocol is not None and not self.protocol.paused

    def send(self, message: bytes) -> bool:
        assert self.protocol is not None and self.protocol.transport is not None
        self.protocol.transport.write(b"%d " % len(message) + message)
        return True

    def stop(self) -> defer.Deferred[None]:
        protocol = self.protocol
        d = defer.maybeDeferred(self.service.stopService)  # closes the connection after its buffer drains
        if protocol is not None:
            waiting = protocol.lost
            waiting.addTimeout(3.0, self.sink.reactor)
            return defer.gatherResults([d, waiting], consumeErrors=True).addBoth(lambda _: None)
        return d.addBoth(lambda _: None)


def _tls(endpoint: IStreamClientEndpoint, spec: SyslogOutput) -> IStreamClientEndpoint:
    """RFC 5425: the same octet-counted frames inside TLS, the receiver's certificate checked."""
    from twisted.internet import ssl
    from twisted.internet.endpoints import wrapClientTLS

    trust: Any = None
    if spec.ca_file:
        with open(spec.ca_file, "rb") as f:
            trust = ssl.trustRootFromCertificates(
                [ssl.Certificate.loadPEM(block) for block in _pem_blocks(f.read())])
    options = ssl.optionsForClientTLS(spec.server_name or spec.host, trustRoot=trust)
    return wrapClientTLS(options, endpoint)


def _pem_blocks(data: bytes) -> list[bytes]:
    end = b"-----END CERTIFICATE-----"
    return [chunk + end for chunk in data.split(end) if b"-----BEGIN CERTIFICATE-----" in chunk]


def _jitter() -> float:
    return random.random() * 0.25


def _endpoint(reactor: Any, host: str, port: int) -> IStreamClientEndpoint:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return HostnameEndpoint(reactor, host, port, timeout=10)
    kind = TCP6ClientEndpoint if ip.version == 6 else TCP4ClientEndpoint
    return kind(reactor, host, port, timeout=10)


class _DatagramLink(_Link):
    """UDP or a Unix datagram socket: a plain non-blocking socket, reopened after failures."""

    RETRY = 1.0

    def __init__(self, sink: SyslogSink) -> None:
        self.sink = sink
        self.sock: socket.socket | None = None
        self.parked: socket.socket | None = None
        self.warned = False
        self.retry_call: IDelayedCall | None = None
        self.address: Any = None

    def start(self) -> None:
        spec = self.sink.spec
        if spec.protocol == "unix":
            self.address = spec.host
            self._open()
            return
        try:
            ipaddress.ip_address(spec.host)
            self.address = (spec.host, spec.port)
            self._open()
        except ValueError:
            d = self.sink.reactor.resolve(spec.host)
            d.addCallback(self._resolved).addErrback(self._failed)

    def _resolved(self, ip: str) -> None:
        self.address = (ip, self.sink.spec.port)
        self._open()

    def _open(self) -> None:
        self.retry_call = None
        family = socket.AF_UNIX if self.sink.spec.protocol == "unix" else (
            socket.AF_INET6 if ":" in self.address[0] else socket.AF_INET)
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.setblocking(False)
        try:
            sock.connect(self.address)
        except OSError as e:
            sock.close()
            self._down(e)
            return
        self.sock = sock
        if self.warned:
            log.info("audit {name}: sending again", name=self.sink.name)
        self.warned = False
        self.sink.pump()

    def _failed(self, failure: Failure) -> None:
        log.error("audit {name}: {error}", name=self.sink.name, error=failure.getErrorMessage())
        self.retry_call = self.sink.reactor.callLater(self.RETRY * 5, self.start)

    def _down(self, error: OSError) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.retry_call is None and not self.sink.stopping:
            if not self.warned:  # once per outage, not once per retry
                log.warn("audit {name}: {error}; retrying every {retry}s", name=self.sink.name,
                         error=error.strerror, retry=self.RETRY)
            self.warned = True
            self.retry_call = self.sink.reactor.callLater(self.RETRY, self._open)

    def ready(self) -> bool:
        return self.sock is not None

    def send(self, message: bytes) -> bool:
        assert self.sock is not None
        try:
            self.sock.send(message)
        except BlockingIOError:
            self._later()
            return False
        except OSError as e:
            if e.errno == errno.EMSGSIZE:
                log.error("audit {name}: a record too large for a datagram was dropped", name=self.sink.name)
                self.sink.losses.add(1)
                return True
            self._down(e)
            return False
        return True

    def _later(self) -> None:
        """The socket buffer is full: try again shortly rather than spin."""
        self.parked, self.sock = self.sock, None

        def again() -> None:
            self.retry_call = None
            self.sock, self.parked = self.parked, None
            self.sink.pump()

        if self.retry_call is None:
            self.retry_call = self.sink.reactor.callLater(0.01, again)

    def stop(self) -> defer.Deferred[None]:
        if self.retry_call is not None and self.retry_call.active():
            self.retry_call.cancel()
        self.retry_call = None
        for sock in (self.sock, self.parked):
            if sock is not None:
                sock.close()
        self.sock = self.parked = None
        return defer.succeed(None)
