"""The limits layer on both backends: headers, 429s, events, per-key limits, reloads, auto-blocks,
and (Redis) outages."""

from __future__ import annotations

import time
from typing import Any

from twisted.internet import defer, task
from twisted.internet import reactor as real_reactor
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from ccproxy.config import parse
from ccproxy.context import Identity, RequestContext
from ccproxy.errors import ApiError
from ccproxy.limits._layer import LimitsLayer, build
from ccproxy.routes import route
from ccproxy.runtime import Deps
from tests.support.authkit import Events
from tests.support.limits import FakeTime, deps, limits_config
from tests.support.redis import ClassRedis
from tests.support.requests import FakeRequest

_UPSTREAMS = parse({"server": {"tls": {"enabled": False}}}).upstreams


def make_ctx(path: bytes = b"/v1/messages", ip: str = "10.1.1.1", identity: Identity | None = None) -> RequestContext:
    request = FakeRequest(b"POST", path, client=ip)
    return RequestContext(request=request, request_id="req_test", route=route(path, _UPSTREAMS), client_ip=ip,
                          started=0.0, body=b"{}", identity=identity, method=b"POST", path=path)


class _LayerTests:
    """Mixed into a TestCase; `state()` gives the `state:` section for the backend under test."""

    def state(self) -> dict[str, Any]:
        raise NotImplementedError

    def setUp(self) -> None:
        self.clock = FakeTime()
        self.deps = deps(self.clock)
        self.events = Events()
        globalLogPublisher.addObserver(self.events)
        self.layers: list[LimitsLayer] = []

    def tearDown(self) -> Any:
        globalLogPublisher.removeObserver(self.events)
        stops = {id(layer.limiter): layer for layer in self.layers if layer.limiter is not None}
        return defer.gatherResults([defer.maybeDeferred(layer.stop) for layer in stops.values()])

    def layer(self, rate_limiting: dict[str, Any] | None = None, auto_block: dict[str, Any] | None = None,
              previous: LimitsLayer | None = None, state: dict[str, Any] | None = None) -> LimitsLayer:
        config = limits_config(rate_limiting, auto_block, state or self.state())
        made = build(config, self.deps, previous)
        self.layers.append(made)
        return made

    async def admit(self, layer: LimitsLayer, ctx: RequestContext | None = None) -> RequestContext:
        ctx = ctx or make_ctx()
        await layer.check(ctx)
        return ctx

    async def refuse(self, layer: LimitsLayer, ctx: RequestContext | None = None) -> ApiError:
        try:
            await layer.check(ctx or make_ctx())
        except ApiError as e:
            return e
        raise AssertionError("the request was admitted")

    @defer.inlineCallbacks
    def test_admitted_and_refused_headers_anthropic(self) -> Any:
        layer = self.layer({"global": {"requests_per_minute": 60, "burst": 2}})
        ctx = yield defer.ensureDeferred(self.admit(layer))
        self.assertEqual(ctx.extra_headers["anthropic-ratelimit-requests-limit"], "60")
        self.assertEqual(ctx.extra_headers["anthropic-ratelimit-requests-remaining"], "1")
        self.assertRegex(ctx.extra_headers["anthropic-ratelimit-requests-reset"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
        yield defer.ensureDeferred(self.admit(layer))
        error = yield defer.ensureDeferred(self.refuse(layer))
        self.assertEqual(error.status, 429)
        self.assertEqual(error.error_type, "rate_limit_error")
        self.assertEqual(error.headers["retry-after"], "1")
        self.assertEqual(error.headers["anthropic-ratelimit-requests-remaining"], "0")
        [event] = self.events.named("rate_limit_exceeded")
        self.assertEqual((event["limit"], event["ip_address"], event["retry_after"]), ("global_minute", "10.1.1.1", 1))

    @defer.inlineCallbacks
    def test_openai_headers_and_retry_after_rounded_up(self) -> Any:
        layer = self.layer({"per_ip": {"requests_per_minute": 40, "burst": 1}})
        ctx = yield defer.ensureDeferred(self.admit(layer, make_ctx(b"/openai/v1/chat/completions")))
        self.assertEqual(ctx.extra_headers["x-ratelimit-limit-requests"], "40")
        self.assertEqual(ctx.extra_headers["x-ratelimit-remaining-requests"], "0")
        self.assertEqual(ctx.extra_headers["x-ratelimit-reset-requests"], "1.5s")
        error = yield defer.ensureDeferred(self.refuse(layer, make_ctx(b"/openai/v1/chat/completions")))
        self.assertEqual(error.headers["retry-after"], "2")  # 1.5 s, rounded up
        self.assertNotIn("anthropic-ratelimit-requests-limit", error.headers)

    @defer.inlineCallbacks
    def test_per_key_tier_own_limit_and_auth_off(self) -> Any:
        layer = self.layer({"per_key": {"default": {"requests_per_minute": 100, "daily_quota": 5},
                                        "premium": {"requests_per_minute": 1000, "daily_quota": 3}}})
        # Without authentication there is no key: per-key limits do not apply.
        for _ in range(5):
            ctx = yield defer.ensureDeferred(self.admit(layer))
            self.assertEqual(ctx.extra_headers, {})
        premium = Identity(key_id="k-premium", tier="premium")
        for _ in range(3):
            yield defer.ensureDeferred(self.admit(layer, make_ctx(identity=premium)))
        error = yield defer.ensureDeferred(self.refuse(layer, make_ctx(identity=premium)))
        self.assertEqual(self.events.named("rate_limit_exceeded")[-1]["limit"], "daily_quota")
        self.assertEqual(self.events.named("rate_limit_exceeded")[-1]["api_key_id"], "k-premium")
        self.assertEqual(error.headers["anthropic-ratelimit-requests-limit"], "3")
        # An unknown tier falls back to `default`; a key's own rate_limit applies on top.
        odd = Identity(key_id="k-odd", tier="gold", rate_limit=20)  # burst 2
        yield defer.ensureDeferred(self.admit(layer, make_ctx(identity=odd)))
        ctx = yield defer.ensureDeferred(self.admit(layer, make_ctx(identity=odd)))
        self.assertEqual(ctx.extra_headers["anthropic-ratelimit-requests-remaining"], "0")
        yield defer.ensureDeferred(self.refuse(layer, make_ctx(identity=odd)))
        self.assertEqual(self.events.named("rate_limit_exceeded")[-1]["limit"], "key_rate_limit")

    @defer.inlineCallbacks
    def test_reload_keeps_counters_of_unchanged_limits(self) -> Any:
        first = self.layer({"global": {"requests_per_minute": 60, "burst": 2},
                            "per_ip": {"requests_per_minute": 60, "burst": 5}})
        for _ in range(2):
            yield defer.ensureDeferred(self.admit(first))
        # per_ip changes, global does not: global is still spent.
        second = self.layer({"global": {"requests_per_minute": 60, "burst": 2},
                             "per_ip": {"requests_per_minute": 30, "burst": 5}}, previous=first)
        self.assertIs(second.limiter, first.limiter)
        error = yield defer.ensureDeferred(self.refuse(second))
        self.assertIn("global_minute", error.message)
        # global changes: it starts afresh.
        third = self.layer({"global": {"requests_per_minute": 60, "burst": 3},
                            "per_ip": {"requests_per_minute": 30, "burst": 5}}, previous=second)
        ctx = yield defer.ensureDeferred(self.admit(third))
        self.assertEqual(ctx.extra_headers["anthropic-ratelimit-requests-remaining"], "2")

    @defer.inlineCallbacks
    def test_auto_block_blocks_refuses_and_expires(self) -> Any:
        layer = self.layer(auto_block={"enabled": True, "threshold": 3, "duration": "10m"})
        for _ in range(3):
            ctx = yield defer.ensureDeferred(self.admit(layer))
            self.assertEqual(ctx.extra_headers, {})  # no rate limit configured: no headers
        error = yield defer.ensureDeferred(self.refuse(layer))
        self.assertEqual(error.status, 429)
        self.assertEqual(error.headers["retry-after"], "600")
        self.assertTrue(self.deps.blocklist.is_blocked("10.1.1.1", self.clock.seconds()))
        [event] = self.events.named("ip_auto_blocked")
        self.assertEqual(event["ip_address"], "10.1.1.1")
        # A keep-alive connection opened before the block is refused by the layer itself.
        self.clock.advance(300)
        error = yield defer.ensureDeferred(self.refuse(layer))
        self.assertEqual(error.headers["retry-after"], "300")
        # Other addresses are unaffected.
        yield defer.ensureDeferred(self.admit(layer, make_ctx(ip="10.1.1.2")))
        self.clock.advance(300)
        assert layer.limiter is not None
        yield layer.limiter.tick()
        [event] = self.events.named("ip_unblocked")
        self.assertEqual(event["ip_address"], "10.1.1.1")
        self.assertFalse(self.deps.blocklist.is_blocked("10.1.1.1", self.clock.seconds()))
        yield defer.ensureDeferred(self.admit(layer))

    @defer.inlineCallbacks
    def test_requests_refused_before_this_layer_count_towards_blocking(self) -> Any:
        layer = self.layer(auto_block={"enabled": True, "threshold": 2, "duration": "1h"})
        for _ in range(3):
            ctx = make_ctx(ip="10.9.9.9")  # e.g. refused by authentication: check() never ran
            layer.completed(ctx, ctx.request, 401)
        deadline = time.monotonic() + 5
        while not self.deps.blocklist.is_blocked("10.9.9.9", self.clock.seconds()) and time.monotonic() < deadline:
            yield task.deferLater(real_reactor, 0.01, lambda: None)
        self.assertTrue(self.deps.blocklist.is_blocked("10.9.9.9", self.clock.seconds()))


class MemoryLayerTests(_LayerTests, unittest.TestCase):
    def state(self) -> dict[str, Any]:
        return {"backend": "memory"}

    @defer.inlineCallbacks
    def test_disabled_is_a_no_op(self) -> Any:
        layer = self.layer({"enabled": False, "global": {"requests_per_minute": 1}})
        self.assertIsNone(layer.limiter)
        for _ in range(5):
            ctx = yield defer.ensureDeferred(self.admit(layer))
            self.assertEqual(ctx.extra_headers, {})


class RedisLayerTests(ClassRedis, _LayerTests, unittest.TestCase):
    def state(self, on_error: str = "fail_open") -> dict[str, Any]:
        return {"backend": "redis", "redis": {"url": self.server.url, "timeout": "1s", "on_error": on_error}}

    @defer.inlineCallbacks
    def test_blocks_reach_every_instance(self) -> Any:
        a = self.layer(auto_block={"enabled": True, "threshold": 1, "duration": "1h"})
        b_deps = Deps(reactor=self.clock, blocklist=deps(self.clock).blocklist)
        b = build(a.config, b_deps, None)
        self.layers.append(b)
        yield defer.ensureDeferred(self.admit(a))
        yield defer.ensureDeferred(self.refuse(a))
        self.assertFalse(b_deps.blocklist.is_blocked("10.1.1.1", self.clock.seconds()))
        assert b.limiter is not None
        yield b.limiter.tick()  # the periodic poll: the first reads every block
        self.assertTrue(b_deps.blocklist.is_blocked("10.1.1.1", self.clock.seconds()))
        self.assertEqual(len(self.events.named("ip_auto_blocked")), 1)
        # Later polls read only the blocks made since.
        self.clock.advance(1)
        yield defer.ensureDeferred(self.admit(a, make_ctx(ip="10.1.1.2")))
        yield defer.ensureDeferred(self.refuse(a, make_ctx(ip="10.1.1.2")))
        yield b.limiter.tick()
        self.assertIsNotNone(b.limiter.synced_at)
        self.assertTrue(b_deps.blocklist.is_blocked("10.1.1.2", self.clock.seconds()))

    @defer.inlineCallbacks
    def test_redis_down_fail_open_then_recovers(self) -> Any:
        layer = self.layer({"global": {"requests_per_hour": 2, "burst": 2}},
                           state={"backend": "redis", "redis": {"url": self.server.url, "timeout": "500ms"}})
        for _ in range(2):
            yield defer.ensureDeferred(self.admit(layer))
        yield defer.ensureDeferred(self.refuse(layer))
        self.server.kill()
        started = time.monotonic()
        for _ in range(20):
            ctx = yield defer.ensureDeferred(self.admit(layer))
            self.assertEqual(ctx.extra_headers, {})
        # Backing off at once after the first failure: twenty requests each waiting for the 500 ms
        # timeout would take 10 s.
        self.assertLess(time.monotonic() - started, 4.0)
        [event] = self.events.named("rate_limit_backend_unavailable")
        self.assertEqual(event["policy"], "fail_open")
        # Redis returns (empty: a restart without persistence); the proxy reconnects by itself.
        self.server.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            self.clock.advance(2)  # past the back-off
            ctx = yield defer.ensureDeferred(self.admit(layer))
            if ctx.extra_headers:
                break
            yield task.deferLater(real_reactor, 0.2, lambda: None)
        self.assertEqual(ctx.extra_headers.get("anthropic-ratelimit-requests-remaining"), "1")
        self.assertEqual(len(self.events.named("rate_limit_backend_recovered")), 1)

    @defer.inlineCallbacks
    def test_redis_down_fail_closed_answers_503_quickly(self) -> Any:
        layer = self.layer({"global": {"requests_per_minute": 100}}, state=self.state("fail_closed"))
        yield defer.ensureDeferred(self.admit(layer))
        self.server.kill()
        started = time.monotonic()
        for _ in range(10):
            error = yield defer.ensureDeferred(self.refuse(layer))
            self.assertEqual((error.status, error.headers["retry-after"]), (503, "1"))
        # Ten refusals, none waiting for the 1 s timeout (that would take 10 s): a refused connection
        # is an answer at once.
        self.assertLess(time.monotonic() - started, 5.0)
        self.assertEqual(self.events.named("rate_limit_backend_unavailable")[0]["policy"], "fail_closed")

    @defer.inlineCallbacks
    def test_hung_redis_never_holds_a_request_beyond_the_timeout(self) -> Any:
        layer = self.layer({"global": {"requests_per_hour": 1, "burst": 1}},
                           state={"backend": "redis", "redis": {"url": self.server.url, "timeout": "300ms"}})
        yield defer.ensureDeferred(self.admit(layer))
        yield defer.ensureDeferred(self.refuse(layer))
        self.server.pause()
        try:
            started = time.monotonic()
            ctx = yield defer.ensureDeferred(self.admit(layer))  # fail_open: admitted, unlimited
            waited = time.monotonic() - started
            # Held for the timeout (a hung Redis would hold it forever): the event below names the 300 ms
            # deadline as the cause, and a slow runner can only make the wait longer.
            self.assertGreaterEqual(waited, 0.29)
            self.assertLess(waited, 10.0)
            self.assertEqual(ctx.extra_headers, {})
            self.assertIn("no answer within 300 ms", self.events.named("rate_limit_backend_unavailable")[0]["reason"])
        finally:
            self.server.resume()
        # Redis answers again: the limit (still spent) is enforced again.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            self.clock.advance(2)
            try:
                yield defer.ensureDeferred(self.layer_check(layer))
            except ApiError as e:
                self.assertEqual(e.status, 429)
                break
            yield task.deferLater(real_reactor, 0.2, lambda: None)
        else:
            self.fail("the limit was not enforced again after Redis came back")

    async def layer_check(self, layer: LimitsLayer) -> None:
        await layer.check(make_ctx())
