"""Where the listening socket comes from: systemd socket activation, a supervisor, or bind().

systemd passes listening sockets as descriptors 3, 4, ... and says so in the environment
(sd_listen_fds(3)): `LISTEN_FDS` is their number, `LISTEN_PID` the process they are meant for (a
child that inherits the environment must not take them too), `LISTEN_FDNAMES` their names, separated
by ':'. A predecessor handing the socket over (see `handover`) and the supervisor starting a worker
use the same convention, so one code path adopts them all. The variables are removed once read.
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping
from typing import Any

import attrs
from twisted.internet import tcp
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.systemd import ListenFDs

from ccproxy._compat import systemd_listen_fds

log = Logger()

FIRST_FD = 3  # SD_LISTEN_FDS_START
NAME = "ccproxy"  # the FileDescriptorName= our ccproxy.socket gives, and the name a handover uses
# Set in a successor started by a restart (see `handover`): the pipe to tell its predecessor it is ready.
HANDOVER_FD_ENV = "CCPROXY_HANDOVER_FD"


class ActivationError(Exception):
    """The environment announces sockets that cannot be used as ccproxy's listener."""


@attrs.frozen
class Inherited:
    fd: int
    name: str


def inherited(environ: MutableMapping[str, str] | None = None) -> list[Inherited]:
    """The listening descriptors passed to this process, with their names; [] when none.

    Read with Twisted's `ListenFDs`, which removes LISTEN_PID and LISTEN_FDS from the environment
    (LISTEN_FDNAMES is removed here), so the processes this one starts do not believe the sockets
    are theirs. Each process takes them once.
    """
    global _taken
    if environ is None:
        if _taken:
            return []
        _taken = True
        # Twisted read (and removed) the variables when twistd imported its endpoints module.
        fds: ListenFDs = systemd_listen_fds()
        os.environ.pop("LISTEN_FDNAMES", None)
    else:
        fds = ListenFDs.fromEnvironment(environ=environ)
        environ.pop("LISTEN_FDNAMES", None)
    names = {fd: name for name, fd in fds.inheritedNamedDescriptors().items()}
    return [Inherited(fd, names.get(fd, "unknown")) for fd in fds.inheritedDescriptors()]


_taken = False


def pick(sockets: list[Inherited]) -> int:
    """The descriptor to serve on: the one named `ccproxy`, or the only one."""
    named = [s.fd for s in sockets if s.name == NAME]
    if len(named) == 1:
        return named[0]
    if len(sockets) == 1:
        return sockets[0].fd
    names = ", ".join(f"{s.fd}={s.name}" for s in sockets)
    raise ActivationError(f"{len(sockets)} sockets passed ({names}) and not exactly one named {NAME!r}: "
                          f"set FileDescriptorName={NAME} on the one to serve")


def describe(fd: int) -> tuple[int, tuple[str, int]]:
    """The address family and (host, port) of a listening TCP socket given by descriptor."""
    probe = socket.socket(fileno=os.dup(fd))
    try:
        if probe.type != socket.SOCK_STREAM or probe.family not in (socket.AF_INET, socket.AF_INET6):
            raise ActivationError(f"descriptor {fd} is not a TCP socket")
        if not probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ActivationError(f"descriptor {fd} is not listening")
        host, port = probe.getsockname()[:2]
        return int(probe.family), (str(host), int(port))
    finally:
        probe.close()


def bind(host: str, port: int, backlog: int = 1024) -> socket.socket:
    """A listening TCP socket, for a process that hands it to others (a supervisor)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE | socket.AI_NUMERICSERV)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def adopt(reactor: Any, fd: int, factory: Any) -> IListeningPort:
    """Serve `factory` on the listening socket `fd` (which stays open for others that hold it)."""
    family, _ = describe(fd)
    # Each process that accepts must not block in accept() when another took the connection first
    # (the flag belongs to the socket, so it is set for all of them at once).
    os.set_blocking(fd, False)
    port: IListeningPort = reactor.adoptStreamPort(fd, family, factory)
    # adoptStreamPort works on a copy of the descriptor: the inherited one is closed, so that only the
    # processes that really serve keep the socket open.
    os.close(fd)
    return port


class _OneAcceptPort(tcp.Port):
    """A port that accepts one connection per wake-up. Twisted's accepts up to 100 (and more as
    bursts grow): on a socket several processes share, the first to wake would take a whole burst
    of connections; one at a time, every waiting worker gets its turn (see bench/balance.py)."""

    @property
    def numberAccepts(self) -> int:
        return 1

    @numberAccepts.setter
    def numberAccepts(self, value: int) -> None:
        pass


def accept_one_at_a_time(port: Any) -> None:
    if type(port) is tcp.Port:
        port.__class__ = _OneAcceptPort


def listen(reactor: Any, host: str, port: int, factory: Any, environ: MutableMapping[str, str] | None = None,
           ) -> tuple[IListeningPort, str]:
    """The listening port: adopted when one was passed, bound otherwise; and where it came from."""
    sockets = inherited(environ)
    if sockets:
        fd = pick(sockets)
        for other in sockets:
            if other.fd != fd:
                os.close(other.fd)
        _, (bound_host, bound_port) = describe(fd)
        if port and bound_port != port:
            log.warn("serving the socket passed by the parent process ({host} port {bound}); server.port "
                     "{port} in the config is not used", host=bound_host, bound=bound_port, port=port)
        listening = adopt(reactor, fd, factory)
        return listening, f"descriptor {fd} passed by the parent process"
    # Bound here and adopted, rather than with listenTCP: a port Twisted binds itself is shut down
    # when it stops listening, which would stop the socket for a successor that shares it too.
    try:
        sock = bind(host, port)
    except OSError as e:
        raise CannotListenError(host, port, e) from None
    return adopt(reactor, sock.detach(), factory), "bound"
