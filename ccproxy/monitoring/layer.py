"""The detectors on the request path: only built when a rule names one."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ccproxy import events
from ccproxy.config import Config
from ccproxy.config.monitoring import SUSPICIOUS
from ccproxy.context import Layer, RequestContext
from ccproxy.errors import ApiError
from ccproxy.monitoring.detectors import Detector

if TYPE_CHECKING:
    from ccproxy.runtime import Deps


class DetectorLayer(Layer):
    def __init__(self, detectors: tuple[str, ...], deps: Deps) -> None:
        self.detectors = tuple(Detector(name) for name in detectors)
        self.deps = deps

    def idle(self) -> frozenset[str]:
        return frozenset({"decorate", "response_filter"})

    async def check_body(self, ctx: RequestContext) -> None:  # the detectors read the body
        uri, body = ctx.request.target, ctx.body
        found = False
        for detector in self.detectors:
            if detector.matches(uri, body):
                found = True
                events.emit(SUSPICIOUS, "warning", detector=detector.name, ip_address=ctx.client_ip,
                            request_id=ctx.request_id,
                            api_key_id=ctx.identity.key_id if ctx.identity is not None else None,
                            path=ctx.path.decode("latin-1")[:200])
        # A rule may have blocked the address on that event: this request is refused with it.
        if found and self.deps.blocklist.is_blocked(ctx.client_ip, self.deps.reactor.seconds()):
            raise ApiError(403, "requests from this client address are not allowed")


def build_layer(config: Config, deps: Deps, previous: Layer | None) -> Layer:
    detectors = config.monitoring.detectors
    return DetectorLayer(detectors, deps) if detectors else Layer()
