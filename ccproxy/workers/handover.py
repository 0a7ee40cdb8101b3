"""Zero-downtime restart: a successor takes the listening socket over while this process drains.

`kill -USR2 <pid>` (or `systemctl kill -s USR2 ccproxy`) starts a new ccproxy with the same command
line, environment and working directory, and hands it the listening socket as descriptor 3 with
`LISTEN_FDS`, exactly as systemd's socket activation does (so the successor adopts it the same
way). The socket is never closed in between, so connections that arrive meanwhile wait in its queue
and are accepted by whichever process takes them first: none is refused.

The successor writes `ready` to a pipe (descriptor 4, named by `CCPROXY_HANDOVER_FD`) once it
serves; only then does this process tell systemd that the successor is the service's main process
(`MAINPID=`, see `Notifier.hand_over`), stop accepting and drain its open connections. If the successor
exits or stays silent for `READY_TIMEOUT` seconds, it is stopped and this process keeps serving: a
broken new version or config never takes the service down.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, MutableMapping
from typing import Any

from twisted.internet import protocol
from twisted.logger import Logger

from ccproxy.notify import Notifier
from ccproxy.workers.activation import HANDOVER_FD_ENV, NAME

log = Logger()

READY_TIMEOUT = 60.0
READY = b"ready\n"
ENV_FD = HANDOVER_FD_ENV
_PIPE_FD = 4
# twistd started as `python -c`: the same interpreter, whatever the twistd script's shebang says.
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
# LISTEN_PID must be the pid of the process that adopts the socket: the shell's own pid, which
# `exec` keeps.
_SET_PID = 'export LISTEN_PID=$$; exec "$@"'


def successor_argv(argv: list[str]) -> list[str]:
    """twistd's arguments for the successor: the same, without a pidfile (the old process still
    holds it; twistd would refuse to start)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--pidfile":
            skip = True
            continue
        if arg.startswith("--pidfile="):
            continue
        out.append(arg)
    return ["--pidfile=", *out]


def launch(reactor: Any, proto: protocol.ProcessProtocol, listen_fd: int, argv: list[str],
           env: dict[str, str], extra_fds: dict[int, Any] | None = None) -> Any:
    """Start `python -c TWISTD argv` with `listen_fd` as descriptor 3, announced as systemd does."""
    env = {**env, "LISTEN_FDS": "1", "LISTEN_FDNAMES": NAME}
    command = ["/bin/sh", "-c", _SET_PID, "sh", sys.executable, "-c", TWISTD, *argv]
    fds: dict[int, Any] = {0: 0, 1: 1, 2: 2, 3: listen_fd, **(extra_fds or {})}
    return reactor.spawnProcess(proto, "/bin/sh", command, env=env, path=os.getcwd(), childFDs=fds)


class _Successor(protocol.ProcessProtocol):
    def __init__(self, handover: Handover) -> None:
        self.handover = handover
        self.buffer = b""

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self.buffer += data[:64]
        if READY in self.buffer:
            self.handover.ready(self)

    def processEnded(self, reason: Any) -> None:
        self.handover.ended(self, reason)


class Handover:
    """Starts a successor on SIGUSR2 and retires this process once the successor is ready."""

    def __init__(self, reactor: Any, listen_fd: Callable[[], int], retire: Callable[[str], Any],
                 argv: list[str] | None = None, environ: MutableMapping[str, str] | None = None,
                 notifier: Notifier | None = None) -> None:
        self.reactor = reactor
        self.notifier = notifier
        self.listen_fd = listen_fd
        self.retire = retire
        self.argv = sys.argv[1:] if argv is None else argv
        self.environ = os.environ if environ is None else environ
        self.successor: _Successor | None = None
        self.transport: Any = None
        self.timeout: Any = None
        self.done = False

    def install(self) -> None:
        signal.signal(signal.SIGUSR2, lambda *_: self.reactor.callFromThread(self.start))

    def start(self) -> None:
        if self.done:
            return
        if self.successor is not None:
            log.warn("restart already under way (successor pid {pid}); SIGUSR2 ignored", pid=self.transport.pid)
            return
        env = {k: v for k, v in self.environ.items() if k != ENV_FD}
        env[ENV_FD] = str(_PIPE_FD)
        self.successor = _Successor(self)
        self.transport = launch(self.reactor, self.successor, self.listen_fd(), successor_argv(self.argv), env,
                                {_PIPE_FD: "r"})
        log.info("restart: started successor pid {pid}; serving until it is ready", pid=self.transport.pid)
        self.timeout = self.reactor.callLater(READY_TIMEOUT, self._too_slow)

    def ready(self, successor: _Successor) -> None:
        if successor is not self.successor or self.done:
            return
        self.done = True
        self._cancel_timeout()
        pid = self.transport.pid
        # The successor lives on after this process exits: forget it so nothing waits for it.
        self.transport.loseConnection()
        if self.notifier is not None:
            # Before the drain, so that systemd follows the successor (and `systemctl reload`
            # signals it) from now on, and this process's exit is not the service's.
            self.notifier.hand_over(pid, f"restarted: pid {pid} serves; pid {os.getpid()} is draining")
        self.retire(f"successor pid {pid} serves on the listening socket")

    def ended(self, successor: _Successor, reason: Any) -> None:
        if successor is not self.successor or self.done:
            return
        self._cancel_timeout()
        self.successor = None
        log.error("restart failed: the successor exited before it was ready ({reason}); still serving",
                  reason=reason.getErrorMessage())

    def _too_slow(self) -> None:
        self.timeout = None
        log.error("restart failed: the successor was not ready within {timeout:g} s; stopping it, still serving",
                  timeout=READY_TIMEOUT)
        try:
            self.transport.signalProcess("KILL")
        except Exception:  # already gone: ended() reports it
            pass

    def _cancel_timeout(self) -> None:
        if self.timeout is not None and self.timeout.active():
            self.timeout.cancel()
        self.timeout = None


def claim(environ: MutableMapping[str, str] | None = None) -> int | None:
    """In a successor: take the descriptor to announce readiness on (None when there is no
    predecessor), and remove it from the environment so that no process started later sees it."""
    env = os.environ if environ is None else environ
    value = env.pop(ENV_FD, None)
    return int(value) if value is not None and value.isdigit() else None


def announce(fd: int | None) -> bool:
    """Tell the predecessor that this process now serves; False when there is none to tell."""
    if fd is None:
        return False
    try:
        os.write(fd, READY)
    except OSError as e:
        log.warn("could not tell the previous process that this one is ready: {error}", error=e.strerror)
        return False
    finally:
        os.close(fd)
    return True


def attach(service: Any) -> Any:
    """For a single-process ccproxy (a ProxyService that listens): restart by SIGUSR2, and tell a
    predecessor that this process is ready. A worker is steered by its supervisor instead."""
    from ccproxy.workers import worker
    from ccproxy.workers.drain import retire

    if worker.is_worker():
        return worker.attach(service)
    port = service.port
    handover = Handover(service.reactor, port.fileno, lambda why: retire(service, why), notifier=service.notifier)
    handover.install()
    announce(claim())
    return handover
