"""The limits layer: one decision per request, 429s the SDKs understand, automatic blocks."""

from __future__ import annotations

import contextlib
import ipaddress
import math
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from twisted.internet import defer
from twisted.logger import Logger

from ccproxy import events
from ccproxy.clock import Clock
from ccproxy.config.limits import FAIL_CLOSED, MEMORY, LimitsConfig, StateConfig
from ccproxy.context import Layer, RequestContext
from ccproxy.errors import ApiError
from ccproxy.limits._core import Decision, Limit
from ccproxy.limits._headers import rate_headers, token_headers, whole_seconds
from ccproxy.limits._memory import MemoryStore
from ccproxy.limits._plan import AutoBlockProbe, Planner, probe_for, token_budgets
from ccproxy.limits._redis import LIFTED, RedisStore, RedisUnavailable
from ccproxy.network.addresses import client_key

if TYPE_CHECKING:
    from ccproxy.http.request import ProxyRequest as Request
    from ccproxy.runtime import Deps
    from ccproxy.workers.state import SharedStore

log = Logger()
_T = TypeVar("_T")

# After Redis fails, requests take the on_error path at once for this long, rather than each
# waiting out the timeout; then one request tries Redis again.
BACKOFF = 1.0
# How often blocks are expired (and, with Redis, learned from other instances).
TICK = 1.0
# A poll for new blocks reaches this far before the previous one (instances' clocks differ a little).
SYNC_SLACK = 10.0
# While Redis stays down, the backend event is repeated at most this often.
REPEAT_EVENT = 60.0

_HEALTH = (b"/health", b"/ready")
# The routes whose replies report token usage (token budgets apply to them).
_COUNTED = frozenset({"messages", "chat_completions", "completions", "responses", "complete"})


class Limiter:
    """What outlives a reload: the store with its counters, the blocks this instance made."""

    def __init__(self, state: StateConfig, deps: Deps) -> None:
        self.state = state
        # Every timer of the limiter and its store: stopping the limiter cancels them all.
        self.clock = Clock(deps.reactor)
        self.blocklist = deps.blocklist
        # Operator and rule blocks (ccproxy.admin.state.IncidentState), if the daemon keeps them.
        self.incident = getattr(deps, "incident", None)
        self.store: MemoryStore | RedisStore | SharedStore
        if state.backend == MEMORY:
            # A worker of several asks the supervisor's store, so limits stay exact across workers.
            self.store = deps.shared_store or MemoryStore(state.max_entries)
        else:
            self.store = RedisStore(state.redis, self.clock)
        # Every block known here (made here or learned from Redis), and those made here, whose end
        # this instance reports.
        self.blocks: dict[str, float] = {}
        self.own_blocks: dict[str, float] = {}
        self.down_until = 0.0
        # When blocks were last read from Redis (None: read them all next time).
        self.synced_at: float | None = None
        # When each target was last lifted here, so a poll's older news of it is not applied again.
        self.lifted_at: dict[str, float] = {}
        self.down_reported = 0.0
        self.failures = 0
        # The current layer's planner, aged by the housekeeping tick.
        self.planner: Planner | None = None

    def start(self) -> None:
        """Connect to Redis (if that is the store) and start the housekeeping: not in the
        constructor, so that making a limiter has no effect outside it."""
        if isinstance(self.store, RedisStore):
            self.store.connect()
        self.clock.looping_call(self.tick, TICK, "rate-limit housekeeping")

    def compatible(self, state: StateConfig) -> bool:
        """Whether `state` can keep this store (and so its counters)."""
        if state.backend != self.state.backend:
            return False
        return state.backend == MEMORY or state.redis == self.state.redis

    def adopt(self, state: StateConfig) -> None:
        self.state = state
        if isinstance(self.store, MemoryStore):
            self.store.resize(state.max_entries)

    async def decide(self, now: float, ip: str, limits: list[Limit], probe: AutoBlockProbe | None) -> Decision:
        """Raises RedisUnavailable when Redis does not answer (at once while backing off)."""
        if isinstance(self.store, MemoryStore):
            return self.store.decide(now, limits, probe)
        return await self._remote(now, self.store.decide(now, limits, probe, ip))

    async def check(self, now: float, ip: str, limits: list[Limit], probe: AutoBlockProbe | None,
                    budgets: list[Limit]) -> tuple[Decision, Decision | None, str | None]:
        """The request limits' decision, then, if they admit the request and it has token budgets,
        the budgets' (None otherwise). Raises RedisUnavailable when the first cannot be had; why
        the second could not be had is the third value."""
        if not isinstance(self.store, MemoryStore | RedisStore):
            # A worker's store: both in one question to the supervisor.
            decision, spent = await self._remote(now, self.store.check(now, ip, limits, probe, budgets))
            return decision, spent, None
        decision = await self.decide(now, ip, limits, probe)
        if not budgets or not decision.allowed or decision.blocked_until is not None:
            return decision, None, None
        try:
            return decision, await self.tokens(now, budgets), None
        except RedisUnavailable as e:
            return decision, None, str(e)

    async def _remote(self, now: float, call: Coroutine[Any, Any, _T], counted: bool = True) -> _T:
        """`call` to the shared store, backing off after a failure; `counted`: a request the
        outage affects (token charges are not counted again)."""
        if now < self.down_until:
            call.close()
            self.failures += 1 if counted else 0
            raise RedisUnavailable("backing off after a failure")
        try:
            answer = await call
        except RedisUnavailable:
            self.down_until = self.clock.seconds() + BACKOFF
            self.failures += 1 if counted else 0
            raise
        self._recovered()
        return answer

    async def charge(self, now: float, budgets: list[Limit], tokens: int) -> None:
        """Charge a finished request's usage to its budgets; raises RedisUnavailable."""
        if isinstance(self.store, MemoryStore):
            self.store.charge(now, budgets, tokens)
        elif isinstance(self.store, RedisStore):
            await self.tokens(now, budgets, tokens)
        else:
            self.store.charge(now, budgets, tokens)  # one-way, to the supervisor

    async def tokens(self, now: float, budgets: list[Limit], charge: int = 0) -> Decision:
        """Charge `charge` tokens to the budgets (none: only ask); raises RedisUnavailable."""
        if isinstance(self.store, MemoryStore):
            return self.store.tokens(now, budgets, charge)
        assert isinstance(self.store, RedisStore)  # a worker's store charges and asks through `check`
        return await self._remote(now, self.store.tokens(now, budgets, charge), counted=False)

    def block(self, ip: str, until: float, new: bool, **fields: Any) -> None:
        self.blocklist.block(ip, until)
        self.blocks[ip] = max(until, self.blocks.get(ip, 0.0))
        if new:
            self.own_blocks[ip] = max(until, self.own_blocks.get(ip, 0.0))
            events.emit("ip_auto_blocked", "warning", ip_address=ip, until=until, **fields)

    def report_failure(self, reason: str, policy: str) -> None:
        now = self.clock.seconds()
        if self.down_reported and now - self.down_reported < REPEAT_EVENT:
            return
        self.down_reported = now
        events.emit("rate_limit_backend_unavailable", "error", reason=reason, policy=policy,
                    affected_requests=self.failures)

    def _recovered(self) -> None:
        if self.down_reported:
            events.emit("rate_limit_backend_recovered", "notice", affected_requests=self.failures)
        self.down_reported = 0.0
        self.down_until = 0.0
        self.failures = 0

    def tick(self) -> defer.Deferred[None] | None:
        now = self.clock.seconds()
        for ip, until in list(self.blocks.items()):
            if until <= now:
                del self.blocks[ip]
        for ip, until in list(self.own_blocks.items()):
            if until <= now:
                # The BlockList entry lapses by itself (and may hold a later block learned since).
                del self.own_blocks[ip]
                events.emit("ip_unblocked", "notice", ip_address=ip, reason="block expired")
        if isinstance(self.store, MemoryStore):
            self.store.sweep(now)
        if self.planner is not None:
            self.planner.age(now)
        if isinstance(self.store, RedisStore) and now >= self.down_until:
            return defer.ensureDeferred(self.sync_blocks(now))
        return None

    async def sync_blocks(self, now: float) -> None:
        """Learn the blocks other instances made, so the listener refuses them at accept too."""
        assert isinstance(self.store, RedisStore)
        blocks: list[tuple[str, float, float]]
        try:
            if self.synced_at is None:
                blocks = [(target, until, -math.inf) for target, until in await self.store.active_blocks(now)]
            else:
                # Only what was made since the last poll (with slack for clocks a little apart).
                blocks = await self.store.blocks_made_since(self.synced_at - SYNC_SLACK)
        except RedisUnavailable:
            self.synced_at = None  # after an outage, read every block again
            return  # requests report the outage; the next tick tries again
        self.synced_at = now
        for lifted, at in list(self.lifted_at.items()):
            if at < now - 2 * SYNC_SLACK:
                del self.lifted_at[lifted]
        for target, until, made in blocks:
            if until == LIFTED:
                self.lift(target)
            elif target in self.lifted_at and made <= self.lifted_at[target]:
                # Made before it was lifted here: a poll that crossed the lifting (its marker not yet
                # in Redis) must not bring the block back.
                continue
            elif until > now:
                if "/" in target:  # a range an operator blocked on some instance
                    with contextlib.suppress(ValueError):
                        self.blocklist.block_network(ipaddress.ip_network(target), until)
                else:
                    self.block(target, until, new=False)

    def lift(self, target: str) -> None:
        """Forget a block here (an operator lifted it, on this instance or another)."""
        self.lifted_at[target] = self.clock.seconds()
        self.blocks.pop(target, None)
        self.own_blocks.pop(target, None)
        if self.incident is not None:
            self.incident.forget(target)
        try:
            self.blocklist.unblock_network(ipaddress.ip_network(target))
        except ValueError:
            self.blocklist.unblock(target)

    def share(self, target: str, until: float | None) -> None:
        """Tell the other instances sharing Redis of an operator's or a rule's block (`until` None:
        lifted). With the memory backend there is no one to tell."""
        if not isinstance(self.store, RedisStore):
            return
        d = defer.ensureDeferred(self.store.share_block(target, until, self.clock.seconds()))
        d.addErrback(lambda f: log.warn("could not share the block of {target} through Redis: {error}",
                                        target=target, error=f.getErrorMessage()))

    def stop(self) -> Any:
        stopped = self.store.stop() if isinstance(self.store, RedisStore) else None
        self.clock.shutdown()
        return stopped


class LimitsLayer(Layer):
    def __init__(self, config: LimitsConfig, limiter: Limiter | None, deps: Deps, ipv6_prefix: int = 64) -> None:
        self.config = config
        # An IPv6 client is limited and blocked by its network of this length (its own /64, by default).
        self.ipv6_prefix = ipv6_prefix
        self.planner = Planner(config)
        self.limiter = limiter
        if limiter is not None:
            limiter.planner = self.planner
        self.clock = deps.reactor
        self.blocklist = deps.blocklist

    def idle(self) -> frozenset[str]:
        if self.limiter is None:
            return frozenset({"check", "completed"})
        return frozenset() if self.config.auto_block.enabled else frozenset({"completed"})

    async def check(self, ctx: RequestContext) -> None:
        if self.limiter is None:
            return
        # Marks the request as counted here, so `decorate` counts only those refused earlier.
        ctx.limits_checked = True
        now = self.clock.seconds()
        ip = client_key(ctx.client_ip, self.ipv6_prefix)
        if self.blocklist.is_blocked(ip, now):
            raise self._blocked(ctx, now)
        limits, probe = self.planner.plan(ip, ctx.identity, now)
        counted = ctx.route.kind in _COUNTED and ctx.request.method == b"POST"
        budgets = token_budgets(self.config, ctx.identity, now) if counted else []
        if not limits and probe is None and not budgets:
            return
        try:
            decision, spent, failure = await self.limiter.check(now, ip, limits, probe, budgets)
        except RedisUnavailable as e:
            self._on_error(str(e))
            return
        if decision.blocked_until is not None:
            self.limiter.block(ip, decision.blocked_until, decision.new_block, request_id=ctx.request_id,
                               threshold=self.config.auto_block.threshold)
            raise self._blocked(ctx, now)
        headers = rate_headers(ctx.api, decision, now)
        if not decision.allowed:
            raise self._refused(ctx, decision, headers)
        ctx.extra_headers.update(headers)
        if failure is not None:
            self._on_error(failure)
        elif spent is not None:
            self._token_budgets(ctx, now, budgets, spent)

    def _token_budgets(self, ctx: RequestContext, now: float, budgets: list[Limit], decision: Decision) -> None:
        """Admit while the key's token budgets are not spent; charge the reply's usage when it ends."""
        headers = token_headers(ctx.api, decision, now)
        if not decision.allowed:
            raise self._refused(ctx, decision, {**ctx.extra_headers, **headers})
        ctx.extra_headers.update(headers)
        # Charged when the request is over, however it ends: a stream cut short pays what it used.
        ctx.request.when_finished().addBoth(lambda _: self._charge(ctx, budgets))

    def _charge(self, ctx: RequestContext, budgets: list[Limit]) -> None:
        usage = ctx.usage
        tokens = usage.total if usage is not None else 0
        if not tokens or self.limiter is None:
            return
        d = defer.ensureDeferred(self.limiter.charge(self.clock.seconds(), budgets, tokens))
        d.addErrback(self._charge_failed, tokens)

    def _charge_failed(self, failure: Any, tokens: int) -> None:
        if failure.check(RedisUnavailable):
            assert self.limiter is not None
            self.limiter.report_failure(f"{failure.value}; {tokens} tokens not charged",
                                        self.limiter.state.redis.on_error)
        else:
            log.failure("token charge failed", failure)

    def _refused(self, ctx: RequestContext, decision: Decision, headers: dict[str, str]) -> ApiError:
        assert decision.limit is not None
        retry = whole_seconds(decision.retry_after)
        events.emit(
            "rate_limit_exceeded", "warning",
            request_id=ctx.request_id, ip_address=ctx.client_ip,
            api_key_id=ctx.identity.key_id if ctx.identity else None,
            user_id=ctx.identity.user_id if ctx.identity else None,
            limit=decision.limit.name, retry_after=retry,
            method=ctx.method.decode("latin-1"), path=ctx.path.decode("latin-1")[:200],
        )
        return ApiError(429, f"rate limit exceeded ({decision.limit.name}); retry after {retry} s",
                        headers=headers)

    def _blocked(self, ctx: RequestContext, now: float) -> ApiError:
        assert self.limiter is not None
        until = self.limiter.blocks.get(client_key(ctx.client_ip, self.ipv6_prefix), now + 1.0)
        events.emit("rate_limit_exceeded", "warning", request_id=ctx.request_id, ip_address=ctx.client_ip,
                    limit="auto_block", retry_after=whole_seconds(until - now))
        return ApiError(429, "too many requests from this address: it is blocked for a while",
                        headers={"retry-after": str(whole_seconds(until - now))})

    def _on_error(self, reason: str) -> None:
        assert self.limiter is not None
        policy = self.limiter.state.redis.on_error
        self.limiter.report_failure(reason, policy)
        if policy == FAIL_CLOSED:
            raise ApiError(503, "rate limiting is unavailable; try again shortly", headers={"retry-after": "1"})

    def completed(self, ctx: RequestContext | None, request: Request, status: int) -> None:
        """Requests refused before this layer (bad keys, unknown paths) still count towards
        auto-blocking: a flood of them is what auto_block is for."""
        if self.limiter is None or not self.config.auto_block.enabled:
            return
        if ctx is not None and ctx.limits_checked:
            return
        if ctx is None and request.path in _HEALTH:
            return
        ip = ctx.client_ip if ctx is not None else str(getattr(request.client_address(), "host", ""))
        ip = client_key(ip, self.ipv6_prefix)
        d = defer.ensureDeferred(self._count_only(ip))
        d.addErrback(lambda f: log.failure("auto-block count failed", f))

    def count_refusal(self, ip: str) -> None:
        """A request the HTTP layer refused before any layer saw it (400, 408, 413, 431) counts
        towards auto-blocking like any other: a flood of malformed requests is what it is for."""
        if self.limiter is None or not self.config.auto_block.enabled:
            return
        d = defer.ensureDeferred(self._count_only(ip))
        d.addErrback(lambda f: log.failure("auto-block count failed", f))

    async def _count_only(self, ip: str) -> None:
        assert self.limiter is not None
        now = self.clock.seconds()
        if self.blocklist.is_blocked(ip, now):
            return
        probe = probe_for(self.config, ip)
        try:
            decision = await self.limiter.decide(now, ip, [], probe)
        except RedisUnavailable as e:
            self.limiter.report_failure(str(e), self.limiter.state.redis.on_error)
            return
        if decision.blocked_until is not None:
            self.limiter.block(ip, decision.blocked_until, decision.new_block,
                               threshold=self.config.auto_block.threshold)

    def stop(self) -> Any:
        return self.limiter.stop() if self.limiter is not None else None


def build(config: LimitsConfig, deps: Deps, previous: Layer | None, ipv6_prefix: int = 64) -> LimitsLayer:
    old = previous.limiter if isinstance(previous, LimitsLayer) else None
    if not config.active:
        if old is not None:
            old.stop()
        return LimitsLayer(config, None, deps, ipv6_prefix)
    if old is not None and old.compatible(config.state):
        old.adopt(config.state)
        return LimitsLayer(config, old, deps, ipv6_prefix)
    limiter = Limiter(config.state, deps)
    limiter.start()
    if old is not None:
        limiter.blocks.update(old.blocks)
        limiter.own_blocks.update(old.own_blocks)
        old.stop()
    return LimitsLayer(config, limiter, deps, ipv6_prefix)
