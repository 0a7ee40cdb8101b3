"""A fake service manager for the notify protocol that judges senders as systemd does.

It binds the datagram socket `$NOTIFY_SOCKET` names, reads each message with the sender's
credentials (SO_PASSCRED: the kernel, not the sender, fills in the pid) and applies the rule of
`NotifyAccess=main`: a message counts only if it comes from the main process; an accepted
`MAINPID=` makes that pid the main process from then on.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass
class Message:
    pid: int  # the sending process, as the kernel reports it
    fields: dict[str, str]
    accepted: bool  # whether systemd, with NotifyAccess=main, would act on it


class FakeManager:
    def __init__(self, path: str, main: int = 0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(path)
        self.path = path
        self.main = main  # the main pid: the process "systemd" started (set once it is known)
        self.messages: list[Message] = []

    def close(self) -> None:
        self.sock.close()

    def receive(self, timeout: float) -> Message | None:
        self.sock.settimeout(timeout)
        try:
            data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
        except TimeoutError:
            return None
        pid = next(_UCRED.unpack(cmsg[:_UCRED.size])[0] for level, kind, cmsg in ancillary
                   if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS)
        fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
        accepted = pid == self.main
        if accepted and "MAINPID" in fields:
            self.main = int(fields["MAINPID"])
        message = Message(pid, fields, accepted)
        self.messages.append(message)
        return message

    def until(self, name: str, timeout: float = 30.0, accepted: bool = True) -> Message:
        """Read until a message with `name` (one systemd acts on, by default) arrives."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self.receive(max(0.01, deadline - time.monotonic()))
            if message is not None and name in message.fields and message.accepted == accepted:
                return message
        raise AssertionError(f"no {name} message within {timeout} s; got {self.messages}")

    def drain(self, quiet: float = 0.5) -> None:
        """Read what is still coming, until `quiet` seconds pass without a message."""
        while self.receive(quiet) is not None:
            pass
