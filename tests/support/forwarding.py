"""The forwarding core's test parts: an upstreams config, and a body relay over fakes."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock

from ccproxy.config import parse
from ccproxy.errors import ANTHROPIC
from ccproxy.relay import Relay
from tests.support.requests import FakeRequest


def upstreams(**anthropic: Any) -> Any:
    """The `upstreams` config: Anthropic at https://a.example:8443/pre (with `anthropic` keys on top),
    OpenAI with a key of its own."""
    return parse({"server": {"tls": {"enabled": False}},
                  "upstreams": {"anthropic": {"base_url": "https://a.example:8443/pre", **anthropic},
                                "openai": {"api_key": "sk-proj-openaiopenaiopenai-0000"}}}, environ={}).upstreams


class FakeProducer:
    """The upstream connection as the relay sees it: paused, resumed or stopped."""

    def __init__(self) -> None:
        self.stopped = False
        self.paused = False

    def stopProducing(self) -> None:
        self.stopped = True

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False


def make_relay(clock: Clock, **kw: Any) -> tuple[Relay, FakeRequest, list[int | None], FakeProducer]:
    """A relay of an Anthropic response (5 s idle timeout) to a fake request; the statuses it wrote
    heads with go to the list."""
    request = FakeRequest()
    heads: list[int | None] = []
    relay = Relay(request, clock, 5.0, heads.append, ANTHROPIC, **kw)
    producer = FakeProducer()
    relay.makeConnection(producer)  # type: ignore[arg-type]
    relay.watch()
    return relay, request, heads, producer
