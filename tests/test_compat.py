"""Canaries for every private name of a dependency that ccproxy uses (all in ccproxy/_compat.py):
each fails when the dependency renames it or changes what ccproxy relies on, so an upgrade past
the versions capped in pyproject.toml is caught here, not in production."""

from __future__ import annotations

import ast
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
import re2
from twisted.internet import defer, tcp
from twisted.internet import reactor as real_reactor
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.trial import unittest

import ccproxy
from ccproxy import _compat
from tests.support.redis import RedisServer

# -- Twisted: a TCP connection's write queue


def _tcp_pair() -> tuple[tcp.Connection, socket.socket]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    conn = tcp.Connection(ours, Protocol(), MemoryReactor())  # type: ignore[arg-type]
    conn.connected = 1  # as tcp.Server / tcp.Client set it once the socket is up
    return conn, theirs


def test_tcp_write_queue_is_read_where_compat_looks() -> None:
    conn, other = _tcp_pair()
    try:
        assert _compat.tcp_write_queue_empty(conn) and _compat.tcp_queued_bytes(conn) == 0
        conn.write(b"abc")  # queued until the reactor says the socket is writable
        conn.write(b"de")
        assert not _compat.tcp_write_queue_empty(conn) and _compat.tcp_queued_bytes(conn) == 5
        conn.doWrite()  # the reactor's turn: the kernel takes it all
        assert _compat.tcp_write_queue_empty(conn) and _compat.tcp_queued_bytes(conn) == 0
        assert other.recv(16) == b"abcde"
        conn.loseWriteConnection()
        conn.doWrite()
        assert not _compat.tcp_write_queue_empty(conn)  # the write side is shut: nothing may be sent
    finally:
        conn.socket.close()
        other.close()


# -- Twisted: Headers filled from checked field lines

_FIELDS = [(b"Host", b"example.com"), (b"content-type", b"application/json"), (b"X-Api-Key", b"k"),
           (b"x-api-key", b"second"), (b"accept", b""), (b"x-weird", b"\x80\xff tab\tin"), (b"te", b"trailers")]


def test_checked_headers_are_what_add_raw_header_makes() -> None:
    from twisted.web.http_headers import Headers

    public = Headers()
    for name, value in _FIELDS:
        public.addRawHeader(name, value)
    ours = _compat.checked_headers(_FIELDS)
    assert ours == public
    assert list(ours.getAllRawHeaders()) == list(public.getAllRawHeaders())  # same order, same names
    assert ours.getRawHeaders(b"x-api-key") == [b"k", b"second"] and ours.hasHeader(b"TE")
    assert _compat.canonical_name(b"content-type") == b"Content-Type" and _compat.canonical_name(b"te") == b"TE"


def test_set_checked_headers_is_set_raw_headers_where_asked() -> None:
    from twisted.web.http_headers import Headers

    lines = [(_compat.canonical_name(name), value) for name, value in [(b"x-frame-options", b"DENY"),
                                                                        (b"Cache-Control", b"no-store")]]
    for replace in (False, True):
        public = Headers({b"x-frame-options": [b"SAMEORIGIN"], b"server": [b"up"]})
        for name, value in lines:
            if replace or not public.hasHeader(name):
                public.setRawHeaders(name, [value])
        ours = Headers({b"x-frame-options": [b"SAMEORIGIN"], b"server": [b"up"]})
        _compat.set_checked_headers(ours, lines, replace)
        assert ours == public
        assert ours.getRawHeaders(b"X-Frame-Options") == ([b"DENY"] if replace else [b"SAMEORIGIN"])


# -- Twisted: the PROXY protocol factory


def test_haproxy_wrapping_factory_reads_the_header_and_names_the_client() -> None:
    seen: list[Any] = []

    class Inner(Protocol):
        def dataReceived(self, data: bytes) -> None:
            seen.append((self.transport.getPeer(), data))  # type: ignore[union-attr]

    wrapped = _compat.HAProxyWrappingFactory(Factory.forProtocol(Inner))
    protocol = wrapped.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    protocol.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 1)))
    protocol.dataReceived(b"PROXY TCP4 203.0.113.9 127.0.0.1 5555 443\r\nhello")
    assert seen == [(IPv4Address("TCP", "203.0.113.9", 5555), b"hello")]


# -- txredisapi: the lazy pool's handshake and give-up state


class RedisPoolCanary(unittest.TestCase):
    def setUp(self) -> None:
        # Its own folder outside the work tree (trial's mktemp() would leave one in it).
        self.server = RedisServer().start()
        self.addCleanup(self.server.stop)

    @defer.inlineCallbacks
    def test_handshake_and_give_up_state(self) -> Any:
        import txredisapi

        pool = txredisapi.lazyConnectionPool(host="127.0.0.1", port=self.server.port, poolsize=1, reconnect=True,
                                             connectTimeout=2, replyTimeout=2)
        handshake = _compat.redis_handshake(pool)
        self.assertIsInstance(handshake, defer.Deferred)
        yield handshake.addTimeout(5, real_reactor)
        self.assertFalse(_compat.redis_gave_up(pool))
        self.assertFalse(_compat.redis_disconnect_called(pool))
        yield pool.disconnect()
        self.assertTrue(_compat.redis_gave_up(pool))
        self.assertTrue(_compat.redis_disconnect_called(pool))


# -- google-re2


def test_re2_pattern_type() -> None:
    assert isinstance(re2.compile("a+"), _compat.Re2Pattern)


@pytest.mark.parametrize("pattern", [b"a+", b"x*", b"\\bsk-[a-z]{3}", b"(?:b)|(c)", "caf\u00e9".encode()])
@pytest.mark.parametrize("text", [b"", b"aaa", b"zz aab sk-abc c", "x caf\u00e9 a".encode(), b"\xff\xfea"])
def test_re2_span_is_the_public_searchs_span(pattern: bytes, text: bytes) -> None:
    compiled = re2.compile(pattern)
    for pos in (0, 1, 3, len(text), len(text) + 5):
        hit = compiled.search(text, pos)
        assert _compat.re2_span(compiled, text, pos) == (hit.span() if hit is not None else None)
        assert _compat.re2_span(compiled, bytearray(text), pos) == (hit.span() if hit is not None else None)


# -- pyOpenSSL: a context's key-exchange groups


def test_set_groups_sets_and_refuses_without_leaving_an_error_behind() -> None:
    from OpenSSL import SSL
    from OpenSSL._util import lib

    context = SSL.Context(SSL.TLS_METHOD)
    _compat.set_groups(context, ["X25519", "P-256"])
    with pytest.raises(ValueError):
        _compat.set_groups(context, ["X25519", "no-such-group"])
    assert lib.ERR_peek_error() == 0  # a stale error would be reported by some later, unrelated call
    # (that the groups set are the ones offered is shown by handshakes in tests/test_tls_groups.py)


# -- Python's own regular-expression parser (content/prefix.py reads its syntax trees)


def test_python_re_parser_gives_the_trees_prefix_patterns_read() -> None:
    from re import _constants as C  # type: ignore[attr-defined]
    from re import _parser as P  # type: ignore[attr-defined]

    from ccproxy.content.prefix import prefix_pattern

    tree = P.parse(r"ab+\d")
    assert [op for op, _ in tree] == [C.LITERAL, C.MAX_REPEAT, C.IN]
    assert prefix_pattern(r"sk-[a-z]{4}") is not None


# -- nowhere else


_PRIVATE_NAMES = ("_observers", "_tempDataBuffer", "_tempDataLen", "_writeDisconnected", "_StandardEndpointFactory",
                  "_newclient", "_wrapper", "_connected", "_factory", "_Regexp", "_context", "_util", "_rawHeaders",
                  "_nameEncoder", "_regexp", "_Anchor")


# Python's standard library is not capped in pyproject.toml: its private names (re._parser) have
# their canary above and stay where they are used.
_OWN_OR_STDLIB = {"ccproxy", "__future__"} | set(sys.stdlib_module_names)


def test_systemd_sockets_are_read_where_compat_looks() -> None:
    from twisted.python.systemd import ListenFDs

    from ccproxy._compat import systemd_listen_fds

    assert isinstance(systemd_listen_fds(), ListenFDs)


def test_no_other_module_uses_a_private_name_of_a_dependency() -> None:
    root = Path(ccproxy.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        if path.name == "_compat.py":
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] not in _OWN_OR_STDLIB:
                private = [part for part in node.module.split(".") if part.startswith("_")]
                private += [alias.name for alias in node.names if alias.name.startswith("_")]
                if private:
                    found.append(f"{path.relative_to(root)}:{node.lineno} from {node.module} import {private}")
            elif isinstance(node, ast.Attribute) and node.attr in _PRIVATE_NAMES:
                found.append(f"{path.relative_to(root)}:{node.lineno} .{node.attr}")
    assert found == []
