"""Layers edit the headers that go upstream (the context's), never the client's request."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet.task import Clock

from ccproxy.blocklist import BlockList
from ccproxy.config import parse
from ccproxy.context import Layer, RequestContext
from ccproxy.errors import ApiError
from ccproxy.http.request import ProxyRequest
from ccproxy.resource import ProxyResource
from ccproxy.runtime import Deps, Runtime, RuntimeHolder
from tests.support.authkit import UPSTREAM_KEYS
from tests.support.hardening import Conn


class Editing(Layer):
    """Takes one client header out of what goes upstream, changes one and adds one."""

    def __init__(self) -> None:
        self.request: ProxyRequest | None = None

    async def check(self, ctx: RequestContext) -> None:
        self.request = ctx.request
        ctx.headers.removeHeader(b"x-client-only")
        ctx.headers.setRawHeaders(b"x-changed", [b"by-layer"])
        ctx.headers.setRawHeaders(b"x-added", [b"yes"])


class Upstream:
    """The forwarder at the boundary: keeps the headers it was asked to send, answers 502."""

    def __init__(self) -> None:
        self.sent: list[dict[bytes, list[bytes]]] = []

    async def send(self, method: bytes, route: Any, headers: Sequence[tuple[bytes, Sequence[bytes]]],
                   body: bytes) -> Any:
        self.sent.append({name.lower(): list(values) for name, values in headers})
        raise ApiError(502, "no upstream in this test")


def test_a_layers_header_change_goes_upstream_and_the_clients_request_keeps_what_it_sent() -> None:
    cfg = parse({"server": {"tls": {"enabled": False}},
                 "upstreams": {name: {"api_key": key} for name, key in UPSTREAM_KEYS.items()}}, environ={})
    clock = Clock()
    layer, upstream = Editing(), Upstream()
    runtime = Runtime(config=cfg, named={"edit": layer}, forwarder=upstream, deps=Deps(clock, BlockList()))
    conn = Conn(cfg.network, resource=ProxyResource(RuntimeHolder(runtime), clock))
    conn.send(b"POST /v1/messages HTTP/1.1\r\nHost: a\r\nX-Client-Only: 1\r\nX-Changed: by-client\r\n"
              b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
    assert conn.output.startswith(b"HTTP/1.1 502 ")
    [sent] = upstream.sent
    assert b"x-client-only" not in sent
    assert sent[b"x-changed"] == [b"by-layer"] and sent[b"x-added"] == [b"yes"]
    assert layer.request is not None
    client = layer.request.request_headers
    assert client.getRawHeaders(b"x-client-only") == [b"1"]
    assert client.getRawHeaders(b"x-changed") == [b"by-client"]
    assert not client.hasHeader(b"x-added")

