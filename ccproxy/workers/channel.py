"""The control channel between the supervisor and one worker: a Unix socket pair, messages framed
by a 4-byte length (Int32StringReceiver), each a mapping with an `op` field.

Most messages are JSON. The limiter's, several per request (questions, answers, charges,
connection slots), take a cheaper form: one tag byte, then `marshal` of the tuple of their fields
in a fixed order. The channel joins only the supervisor and the workers it started, never anything
a client sends; even so each such message is bounded by the frame's length, and one that does not
decode to the expected shape closes the channel as a broken one.
"""

from __future__ import annotations

import json
import marshal
import os
import socket
from collections.abc import Callable
from typing import Any

from twisted.internet import protocol
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure

# A config file travels in a message: bounded, but far above any real config.
MAX_MESSAGE = 16 * 1024 * 1024

Handler = Callable[[dict[str, Any]], None]

# The hot messages: op -> (tag byte, its fields in order). A JSON message starts with "{", never
# with one of these tags.
FAST: dict[str, tuple[int, tuple[str, ...]]] = {
    "decide": (1, ("id", "items", "charges")),
    "decided": (2, ("id", "answers")),
    "charge": (3, ("items",)),
    "admit": (4, ("id", "items")),
    "admitted": (5, ("id", "answers")),
    "release": (6, ("hosts",)),
}
_BY_TAG: dict[int, tuple[str, tuple[str, ...]]] = {tag: (op, names) for op, (tag, names) in FAST.items()}
_PREFIX = {op: bytes([tag]) for op, (tag, _) in FAST.items()}
_MARSHAL_VERSION = 4
log = Logger()


class Channel(Int32StringReceiver):
    MAX_LENGTH = MAX_MESSAGE

    def __init__(self, handle: Handler, lost: Callable[[], None]) -> None:
        self.handle = handle
        self.lost = lost
        self.open = False

    def connectionMade(self) -> None:
        self.open = True
        # Written straight to the socket while nothing waits in the transport's buffer: the
        # transport's own path (buffer, then the reactor's writable event, two poll registrations
        # per message) measured about 12 us of CPU per message on each side.
        get_handle = getattr(self.transport, "getHandle", None)
        handle = get_handle() if get_handle is not None else None
        self._socket: socket.socket | None = handle if isinstance(handle, socket.socket) else None
        self._queued = False  # data waits in the transport: later messages must follow it there
        self._registering = False

    def sendString(self, string: bytes) -> None:
        frame = len(string).to_bytes(4, "big") + string  # OverflowError past what 4 bytes can say
        sock = self._socket
        if sock is not None and not self._queued and not self.transport.disconnecting:  # type: ignore[union-attr]
            try:
                sent = sock.send(frame)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                sent = 0  # the transport meets the same error and closes the channel
            if sent == len(frame):
                return
            frame = frame[sent:]
            # The socket is full: the rest, and every message after it, through the transport,
            # until it says its buffer is empty (a pull producer's resumeProducing).
            self._queued = True
            self._registering = True
            self.transport.registerProducer(self, False)  # type: ignore[union-attr]
            self._registering = False
        self.transport.write(frame)  # type: ignore[union-attr]

    def resumeProducing(self) -> None:
        if self._registering or not self._queued:
            return  # registering calls it at once: the buffer is not empty yet
        self._queued = False
        self.transport.unregisterProducer()  # type: ignore[union-attr]

    def stopProducing(self) -> None:
        self._queued = False

    def send(self, op: str, **fields: Any) -> None:
        if not self.open:
            return
        fast = FAST.get(op)
        if fast is not None and len(fields) == len(fast[1]):
            try:
                values = tuple([fields[name] for name in fast[1]])
            except KeyError:
                pass
            else:
                self.sendString(_PREFIX[op] + marshal.dumps(values, _MARSHAL_VERSION))
                return
        self.sendString(json.dumps({"op": op, **fields}, separators=(",", ":")).encode())

    def stringReceived(self, data: bytes) -> None:
        if not data:
            return
        fast = _BY_TAG.get(data[0])
        if fast is None:
            message = json.loads(data)
            if isinstance(message, dict) and isinstance(message.get("op"), str):
                self.handle(message)
            return
        op, names = fast
        try:
            values = marshal.loads(memoryview(data)[1:])
        except (EOFError, ValueError, TypeError):
            values = None
        if type(values) is not tuple or len(values) != len(names):
            log.error("control channel: a malformed {op} message; closing the channel", op=op)
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        message = dict(zip(names, values, strict=True))
        message["op"] = op
        self.handle(message)

    def lengthLimitExceeded(self, length: int) -> None:
        self.transport.abortConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self.open:
            self.open = False
            self.lost()


class _One(protocol.Factory):
    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    def buildProtocol(self, addr: Any) -> Channel:
        return self.channel


def adopt(reactor: Any, fd: int, channel: Channel) -> Channel:
    """Run `channel` over the connected Unix socket `fd` (closed here: the reactor keeps a copy)."""
    os.set_blocking(fd, False)
    reactor.adoptStreamConnection(fd, socket.AF_UNIX, _One(channel))
    os.close(fd)
    return channel
