"""Everything built from one config: the layers, in order, and the forwarder.

A reload builds a new Runtime from the new config (handing each layer its predecessor of the same
name, so state such as rate-limit counters can carry over) and swaps it in with one assignment.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.web.http_headers import Headers

from ccproxy.blocklist import BlockList
from ccproxy.config import Config
from ccproxy.config.network import DDoSConfig
from ccproxy.context import BodyFilter, Layer, RequestContext
from ccproxy.forward import Forwarder
from ccproxy.http.budget import Budget

if TYPE_CHECKING:
    from ccproxy.admin.state import IncidentState
    from ccproxy.http.request import ProxyRequest as Request


@attrs.frozen
class Deps:
    """What layers share and what outlives a reload."""

    # The daemon's reactor: layers read the time and set timers on it; auth builds its side-call
    # client on it too (tests give a task.Clock, or a MemoryReactorClock where connections are made).
    reactor: IReactorTime
    blocklist: BlockList
    # Bytes buffered for clients across the process (request bodies; response bodies held whole
    # for masking should take from it too): acquire before buffering, release after.
    buffers: Budget = attrs.field(factory=lambda: Budget(lambda: DDoSConfig().max_buffered_bytes))
    # Operator blocks and the emergency switch (None in tests that build a runtime alone).
    incident: IncidentState | None = None
    # In a worker of `server.workers`: the supervisor's limit store, used in place of a memory store.
    shared_store: Any = None


# (config, deps, the same layer of the previous runtime or None) -> layer
LayerFactory = Callable[[Config, Deps, "Layer | None"], Layer]


def layer_factories() -> Mapping[str, LayerFactory]:
    """The policy layers by name, in the order a request meets them."""
    from ccproxy import auth, limits
    from ccproxy.admin import emergency
    from ccproxy.content import layer as content
    from ccproxy.monitoring import layer as detectors
    from ccproxy.network import layer as network

    return {"network": network.build_layer, "auth": auth.build_layer, "emergency": emergency.build_layer,
            "detectors": detectors.build_layer, "limits": limits.build_layer, "content": content.build_layer}


@attrs.define
class Runtime:
    config: Config
    # By name, in the order a request meets them: a reload hands each its namesake.
    named: Mapping[str, Layer]
    forwarder: Forwarder
    deps: Deps
    layers: tuple[Layer, ...] = attrs.field(init=False)
    # The layers that take part in each step: a layer that does not override a step costs nothing there.
    # Head checks run before the body is read; body checks after.
    head_checkers: tuple[Layer, ...] = attrs.field(init=False)
    body_checkers: tuple[Layer, ...] = attrs.field(init=False)
    filterers: tuple[Layer, ...] = attrs.field(init=False)
    decorators: tuple[Layer, ...] = attrs.field(init=False)
    completers: tuple[Layer, ...] = attrs.field(init=False)
    # Whether an audit output records one line per request: if none does, none is built.
    logs_access: bool = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.layers = tuple(self.named.values())
        audit = self.config.audit
        self.logs_access = audit.enabled and any(output.records == "access" for output in audit.outputs)
        self.head_checkers = _overriding(self.layers, "check")
        self.body_checkers = _overriding(self.layers, "check_body")
        self.filterers = _overriding(self.layers, "response_filter")
        self.decorators = _overriding(self.layers, "decorate")
        self.completers = _overriding(self.layers, "completed")

    def response_filter(self, ctx: RequestContext, status: int, headers: Headers) -> BodyFilter | None:
        filters = [f for f in (layer.response_filter(ctx, status, headers) for layer in self.filterers) if f]
        if not filters:
            return None
        if len(filters) > 1:
            raise RuntimeError("only one layer may rewrite response bodies")
        return filters[0]

    def decorate(self, ctx: RequestContext | None, request: Request, headers: Headers) -> None:
        for layer in self.decorators:
            layer.decorate(ctx, request, headers)

    def completed(self, ctx: RequestContext | None, request: Request, status: int) -> None:
        for layer in self.completers:
            layer.completed(ctx, request, status)

    def stop(self) -> defer.Deferred[Any]:
        return defer.gatherResults(
            [defer.maybeDeferred(layer.stop) for layer in self.layers], consumeErrors=True
        )


def _overriding(layers: tuple[Layer, ...], step: str) -> tuple[Layer, ...]:
    return tuple(
        layer for layer in layers
        if getattr(type(layer), step) is not getattr(Layer, step) and step not in layer.idle()
    )


def build(config: Config, deps: Deps, forwarder: Forwarder, previous: Runtime | None = None) -> Runtime:
    before = previous.named if previous is not None else {}
    named = {name: factory(config, deps, before.get(name)) for name, factory in layer_factories().items()}
    return Runtime(config=config, named=named, forwarder=forwarder, deps=deps)


class RuntimeHolder:
    """The one place the current Runtime lives; requests read it once, at their start."""

    def __init__(self, runtime: Runtime) -> None:
        self.current = runtime
        self.ready = False
        # What /ready answers while ready (a worker adds its own and its siblings' state).
        self.ready_body = b'{"status":"ready"}'
