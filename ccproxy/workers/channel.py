"""The control channel between the supervisor and one worker: a Unix socket pair, JSON messages
framed by a 4-byte length (Int32StringReceiver), each a mapping with an `op` field."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from typing import Any

from twisted.internet import protocol
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure

# A config file travels in a message: bounded, but far above any real config.
MAX_MESSAGE = 16 * 1024 * 1024

Handler = Callable[[dict[str, Any]], None]


class Channel(Int32StringReceiver):
    MAX_LENGTH = MAX_MESSAGE

    def __init__(self, handle: Handler, lost: Callable[[], None]) -> None:
        self.handle = handle
        self.lost = lost
        self.open = False

    def connectionMade(self) -> None:
        self.open = True

    def send(self, op: str, **fields: Any) -> None:
        if self.open:
            self.sendString(json.dumps({"op": op, **fields}, separators=(",", ":")).encode())

    def stringReceived(self, data: bytes) -> None:
        message = json.loads(data)
        if isinstance(message, dict) and isinstance(message.get("op"), str):
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
