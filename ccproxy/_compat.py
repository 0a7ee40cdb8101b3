"""Every use of a private name of a dependency, in one place.

ccproxy reaches past the public API of Twisted, txredisapi and google-re2 in a few spots where the
public API has no equivalent (and pyOpenSSL in one). Each such use is a function or alias here, and each has a canary in
tests/test_compat.py that fails when the dependency renames or changes what it relies on; the
versions tested are capped in pyproject.toml. Nothing else in the package may name a private
attribute of a dependency (tests/test_compat.py checks that too).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import re2
from twisted.internet import tcp
from twisted.protocols.haproxy._wrapper import HAProxyWrappingFactory
from twisted.web.http_headers import Headers, _nameEncoder

__all__ = [
    "HAProxyWrappingFactory",
    "Re2Pattern",
    "canonical_name",
    "checked_headers",
    "re2_span",
    "redis_disconnect_called",
    "redis_gave_up",
    "redis_handshake",
    "set_checked_headers",
    "set_groups",
    "systemd_listen_fds",
    "tcp_queued_bytes",
    "tcp_write_queue_empty",
]

# -- Twisted

# The factory that reads a PROXY protocol header before the wrapped protocol sees a byte. The
# public `haproxy.proxyEndpoint` wraps a whole server endpoint; the gate needs to choose per
# connection (by the peer's address) whether the header is read, so it wraps a factory.
HAProxyWrappingFactory = HAProxyWrappingFactory


def systemd_listen_fds() -> Any:
    """The sockets systemd passed this process (a `twisted.python.systemd.ListenFDs`).

    twistd imports twisted.internet.endpoints while it lists its plugins, and that module reads
    LISTEN_PID/LISTEN_FDS once, at import, into `_SystemdParser._sddaemon` (removing the variables
    from the environment): its reading is the only one left, so it is the one to use.
    """
    from twisted.internet.endpoints import _SystemdParser

    return _SystemdParser._sddaemon


# Headers from field lines already checked (token names; values without CR, LF or NUL, which is
# all Headers' per-value sanitising looks for): filled straight into its name -> values table
# (`_rawHeaders`, keyed by `_nameEncoder`'s canonical names), as addRawHeader / setRawHeaders
# would, without their per-value checks. Three Headers are filled per request; the public calls
# cost about twice as much.


def canonical_name(name: bytes) -> bytes:
    """The name as Headers keys it (Content-Type); raises InvalidHeaderName for a non-token."""
    return _nameEncoder.encode(name)


def checked_headers(fields: Iterable[tuple[bytes, bytes]]) -> Headers:
    """Headers holding the checked (name, value) `fields`, in order, as addRawHeader would."""
    headers = Headers()
    table = headers._rawHeaders
    encode = _nameEncoder.encode
    for name, value in fields:
        key = encode(name)
        values = table.get(key)
        if values is None:
            table[key] = [value]
        else:
            values.append(value)
    return headers


def set_checked_headers(headers: Headers, fields: Iterable[tuple[bytes, bytes]], replace: bool) -> None:
    """Each of the checked (canonical name, value) `fields` set as the only value of its name
    (setRawHeaders(name, [value])), or, unless `replace`, only where `headers` has none."""
    table = headers._rawHeaders
    for key, value in fields:
        if replace or key not in table:
            table[key] = [value]


def tcp_write_queue_empty(conn: tcp.Connection) -> bool:
    """Whether nothing written to this TCP connection waits in its queue (abstract.FileDescriptor's
    `dataBuffer`/`offset` and `_tempDataBuffer`), and its write side is open."""
    return bool(
        not conn._writeDisconnected
        and not conn._tempDataBuffer
        and conn.offset == len(conn.dataBuffer)
    )


def tcp_queued_bytes(conn: tcp.Connection) -> int:
    """Bytes written to this TCP connection that the kernel has not taken yet."""
    return len(conn.dataBuffer) - conn.offset + conn._tempDataLen


# -- txredisapi (a lazy connection pool is a ConnectionHandler over a RedisFactory)


def redis_handshake(pool: Any) -> Any:
    """The Deferred that fires when the pool's first connection has connected and authenticated."""
    return pool._connected


def redis_gave_up(pool: Any) -> bool:
    """Whether the pool's factory stopped for good (no more reconnection attempts)."""
    return bool(pool._factory.stopped)


def redis_disconnect_called(pool: Any) -> bool:
    """Whether `pool.disconnect()` has already been called."""
    return bool(pool._factory.disconnectCalled)


# -- google-re2

# The type of a compiled pattern; the module exports no public name for it.
Re2Pattern = re2._Regexp

_UNANCHORED = re2._Anchor.UNANCHORED


def re2_span(pattern: Any, text: bytes, pos: int) -> tuple[int, int] | None:
    """`pattern.search(text, pos).span()` for bytes (None when nothing matches), asked of the
    compiled pattern itself (`_regexp.Match`): the public search builds a generator and a match
    object around that one call, about twice its cost, and masking searches every text it sees."""
    end = len(text)
    pos = max(0, min(pos, end))
    span: tuple[int, int] = pattern._regexp.Match(_UNANCHORED, text, pos, end)[0]
    return None if span[0] == -1 else span


# -- pyOpenSSL: the key-exchange groups of a context


def set_groups(context: Any, names: list[str]) -> None:
    """Offer exactly these key-exchange groups (OpenSSL names, most preferred first) on a
    pyOpenSSL Context; raises ValueError if the linked OpenSSL refuses the list. pyOpenSSL has only
    `set_tmp_ecdh`, which sets a single elliptic curve (and no X25519 or hybrid group)."""
    from OpenSSL._util import lib

    if lib.SSL_CTX_set1_curves_list(context._context, ":".join(names).encode()) != 1:
        lib.ERR_clear_error()  # or the refusal surfaces as the error of some later call
        raise ValueError(f"OpenSSL refuses the groups {':'.join(names)}")
