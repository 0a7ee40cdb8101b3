"""Limits shared by every ccproxy instance through one Redis: one Lua script (EVALSHA) decides.

The script does what `MemoryStore.decide` does, atomically inside Redis, with the caller's clock
passed in (so instances agree as far as their clocks do, and tests stay deterministic). Requests
that arrive in the same reactor turn share one call, each still decided on its own, atomically, in
arrival order: one round trip for many, which is most of Redis's cost here. Blocks live in Redis as
`block:<ip>` keys (refused by the script on every instance) and in the sorted set `blocks` (ip by
end time) that every instance polls to refuse blocked addresses at accept.

txredisapi is imported inside `connect()` only: importing it installs the default reactor, which
must not happen while twistd is still choosing one.
"""

from __future__ import annotations

import hashlib
from typing import Any

from twisted.internet import defer

from ccproxy._compat import redis_disconnect_called, redis_gave_up, redis_handshake
from ccproxy.config.limits import RedisState
from ccproxy.limits._core import Decision, Limit, Outcome, Rate, combine
from ccproxy.limits._plan import AutoBlockProbe

PREFIX = "ccproxy:rl:"
BLOCKS = PREFIX + "blocks"
BLOCKS_MADE = BLOCKS + ":made"  # written by the script (a key it derives: see "Cluster" in the docs)
CLOCK = PREFIX + "clock"
# In the blocks-made feed, this end time means "lifted" (ccproxy security unblock-ip).
LIFTED = 0.0
_FOREVER = 10 * 365 * 86400.0
# Keys outlive their meaning by this margin: harmless, and an injected test clock may run slower
# than Redis's own.
_MARGIN_MS = 60_000

# One call decides a batch of requests (those that arrived in the same reactor turn), each one
# atomically and in order, as if each had its own call: one round trip and one script run for many.
# ARGV[1]: the requests, separated by ';'. Each is space-separated: now, ip, probe(0|1), probe
#          threshold, probe window, block duration, key margin (ms), then per limit: kind ('r'|'q'),
#          interval|count, depth|reset_at. (One string encodes far faster in txredisapi than many.)
# KEYS: per request, in order: block key, blocks zset, auto-block key, then one key per limit; last,
#       the clock key (the latest time any request was decided at).
# Returns one string, the requests' answers separated by ';' (one bulk reply parses far faster than
# an array): "status until" for a block (2: already blocked, 3: blocked now), or "1|0" then per limit
# "allowed remaining reset_after retry_after", space-separated.
SCRIPT = """
local function f(x) return string.format('%.17g', x) end

local function gcra(key, interval, depth, now)
  local tat = tonumber(redis.call('GET', key) or '')
  local start = now
  if tat ~= nil and tat >= now then start = tat end
  local new_tat = start + interval
  local ahead = new_tat - now
  if ahead > depth + 1e-6 then
    return {0, 0, start - now, ahead - depth, start}
  end
  return {1, math.floor((depth - ahead) / interval + 1e-6), ahead, 0, new_tat}
end

-- Time never runs backwards here: a request stamped earlier than one already decided (another
-- instance's clock, or a batch's order) takes the latest time seen, so no allowance is lost to it.
local clock = tonumber(redis.call('GET', KEYS[#KEYS]) or '0')

local function one(K, A)
  local now = math.max(tonumber(A[1]), clock)
  clock = now
  local margin = tonumber(A[7])
  local blocked = redis.call('GET', K[1])
  if blocked and tonumber(blocked) > now then
    return '2 ' .. blocked
  end
  if A[3] == '1' then
    -- The address's latest times, at most threshold + 1: more than threshold in a window blocks.
    local threshold, window = tonumber(A[4]), tonumber(A[5])
    redis.call('RPUSH', K[3], f(now))
    redis.call('LTRIM', K[3], -(threshold + 1), -1)
    local oldest = tonumber(redis.call('LINDEX', K[3], 0))
    if redis.call('LLEN', K[3]) > threshold and oldest > now - window then
      local until_ = now + tonumber(A[6])
      redis.call('SET', K[1], f(until_), 'PX', math.ceil(tonumber(A[6]) * 1000))
      redis.call('ZREMRANGEBYSCORE', K[2], '-inf', f(now))
      redis.call('ZADD', K[2], f(until_), A[2])
      -- What other instances poll: blocks by the time they were made, kept two minutes.
      redis.call('ZADD', K[2] .. ':made', f(now), A[2] .. ' ' .. f(until_))
      redis.call('ZREMRANGEBYSCORE', K[2] .. ':made', '-inf', f(now - 120))
      redis.call('DEL', K[3])
      return '3 ' .. f(until_)
    end
    redis.call('PEXPIRE', K[3], math.ceil(window * 1000) + margin)
  end
  local out = {1}
  local new = {}
  local ok = true
  local n = (#A - 7) / 3
  for i = 1, n do
    local kind, a, b = A[5 + 3 * i], tonumber(A[6 + 3 * i]), tonumber(A[7 + 3 * i])
    local o
    if kind == 'r' then
      o = gcra(K[3 + i], a, b, now)
    else
      local used = tonumber(redis.call('GET', K[3 + i]) or '0')
      local left = b - now
      if used + 1 > a then o = {0, 0, left, left, used} else o = {1, a - used - 1, left, 0, used + 1} end
    end
    if o[1] == 0 then ok = false end
    new[i] = o
    out[#out + 1] = o[1]
    out[#out + 1] = o[2]
    out[#out + 1] = f(o[3])
    out[#out + 1] = f(o[4])
  end
  if not ok then
    out[1] = 0
    return table.concat(out, ' ')
  end
  for i = 1, n do
    redis.call('SET', K[3 + i], f(new[i][5]), 'PX', math.ceil(new[i][3] * 1000) + margin)
  end
  return table.concat(out, ' ')
end

local replies = {}
local used = 0
for request in string.gmatch(ARGV[1], '[^;]+') do
  local A = {}
  for word in string.gmatch(request, '%S+') do A[#A + 1] = word end
  local count = 3 + (#A - 7) / 3
  local K = {}
  for i = 1, count do K[i] = KEYS[used + i] end
  used = used + count
  replies[#replies + 1] = one(K, A)
end
redis.call('SET', KEYS[#KEYS], f(clock), 'PX', 86400000)
return table.concat(replies, ';')
"""


_SCRIPT_BYTES = SCRIPT.encode()
_SHA = hashlib.sha1(_SCRIPT_BYTES).hexdigest()

# Token budgets: charge ARGV[2] tokens (0: only ask) to every budget, then answer as the request
# script does, "allowed remaining reset_after retry_after" per budget. The same arithmetic as
# `_core.token_outcome` / `token_charge`, atomically, so instances sharing Redis share the budgets.
# ARGV: now, tokens, key margin (ms), then per budget: kind ('r'|'q'), interval|count, depth|reset_at.
TOKEN_SCRIPT = """
local function f(x) return string.format('%.17g', x) end
local clock = tonumber(redis.call('GET', KEYS[#KEYS]) or '0')
local now = math.max(tonumber(ARGV[1]), clock)
local charge = tonumber(ARGV[2])
local margin = tonumber(ARGV[3])
local out = {}
for i = 1, #KEYS - 1 do
  local kind, a, b = ARGV[1 + 3 * i], tonumber(ARGV[2 + 3 * i]), tonumber(ARGV[3 + 3 * i])
  local state = tonumber(redis.call('GET', KEYS[i]) or '')
  if kind == 'r' then
    if state == nil or state < now then state = now end
    if charge > 0 then
      state = state + charge * a
      redis.call('SET', KEYS[i], f(state), 'PX', math.ceil((state - now) * 1000) + margin)
    end
    local ahead = state - now
    local remaining = math.floor((b - ahead) / a + 1e-6)
    if remaining < 1 then
      out[#out + 1] = '0 0 ' .. f(ahead) .. ' ' .. f(ahead - b + a)
    else
      out[#out + 1] = '1 ' .. remaining .. ' ' .. f(ahead) .. ' 0'
    end
  else
    local used = state or 0
    if charge > 0 then
      used = used + charge
      redis.call('SET', KEYS[i], f(used), 'PX', math.ceil((b - now) * 1000) + margin)
    end
    local left = b - now
    if used >= a then
      out[#out + 1] = '0 0 ' .. f(left) .. ' ' .. f(left)
    else
      out[#out + 1] = '1 ' .. string.format('%d', a - used) .. ' ' .. f(left) .. ' 0'
    end
  end
end
if now > clock then redis.call('SET', KEYS[#KEYS], f(now), 'PX', 86400000) end
return '1 ' .. table.concat(out, ' ')
"""
_TOKEN_BYTES = TOKEN_SCRIPT.encode()
_TOKEN_SHA = hashlib.sha1(_TOKEN_BYTES).hexdigest()


# Requests decided by one script call at most; more in one reactor turn make several calls.
MAX_BATCH = 64
# (keys, arguments, the request's Deferred answer)
_Pending = tuple[list[str], str, "defer.Deferred[str]"]


class RedisUnavailable(Exception):
    """Redis did not answer in time or at all."""


class RedisStore:
    def __init__(self, settings: RedisState, reactor: Any) -> None:
        self.settings = settings
        self.reactor = reactor
        self._pool: Any = None
        self._pending: list[_Pending] = []
        self._flush_call: Any = None

    def connect(self) -> None:
        import txredisapi  # lazily: see the module docstring

        s = self.settings
        self._pool = txredisapi.lazyConnectionPool(
            host=s.host,
            port=s.port,
            # db 0 needs no SELECT: one handshake step fewer that could fail (see `_heal`).
            dbid=s.db or None,
            # One connection: batches already pipeline, and one connection keeps them in order.
            poolsize=1,
            reconnect=True,
            password=s.password.reveal() if s.password else None,
            connectTimeout=max(1.0, s.timeout),
            # A connection silent this long is dropped and made again.
            replyTimeout=max(1.0, 10 * s.timeout),
        )
        # A handshake cut short fails this Deferred; the outage is reported by the requests.
        redis_handshake(self._pool).addErrback(lambda _: None)

    def _heal(self) -> None:
        """txredisapi gives up for good when a connection drops between connect and AUTH/SELECT
        (Redis dying or restarting at that moment): start a new pool then."""
        pool = self._pool
        if pool is not None and redis_gave_up(pool):
            self._pool = None
            if not redis_disconnect_called(pool):
                defer.maybeDeferred(pool.disconnect).addErrback(lambda _: None)
            self.connect()

    def _call(self, d: defer.Deferred[Any]) -> defer.Deferred[Any]:
        return d.addTimeout(self.settings.timeout, self.reactor)

    async def decide(
        self, now: float, limits: list[Limit], probe: AutoBlockProbe | None = None, ip: str = ""
    ) -> Decision:
        if self._pool is None:
            raise RedisUnavailable("not connected")
        ip = probe.ip if probe is not None else ip
        keys = [PREFIX + "block:" + ip, BLOCKS, PREFIX + (probe.rate.key if probe else "none")]
        # Never empty and never with a space or ';': the arguments travel as one string.
        args: list[str] = [repr(now), "".join(ip.replace(";", "").split()) or "-"]
        if probe is not None:
            args += ["1", str(probe.rate.count), repr(probe.rate.period), repr(probe.duration)]
        else:
            args += ["0", "0", "0", "0"]
        args.append(str(_MARGIN_MS))
        for limit in limits:
            keys.append(PREFIX + limit.key)
            if isinstance(limit, Rate):
                args += ["r", repr(limit.interval), repr(limit.depth)]
            else:
                args += ["q", str(limit.count), repr(limit.reset_at)]
        try:
            reply = await self._call(self._submit(keys, " ".join(args)))
        except defer.TimeoutError:
            raise RedisUnavailable(f"no answer within {self.settings.timeout * 1000:g} ms") from None
        try:
            return _decision(reply, now, limits, probe)
        except (ValueError, IndexError):
            # Not ours (another program's script under our name?): the on_error policy applies.
            raise RedisUnavailable(f"unexpected reply from the script: {reply[:80]!r}") from None

    async def tokens(self, now: float, budgets: list[Limit], charge: int = 0) -> Decision:
        """Charge `charge` tokens to every budget (none: only ask), then say whether they admit."""
        if self._pool is None:
            raise RedisUnavailable("not connected")
        keys = [PREFIX + b.key for b in budgets] + [CLOCK]
        args = [repr(now), str(int(charge)), str(_MARGIN_MS)]
        for limit in budgets:
            if isinstance(limit, Rate):
                args += ["r", repr(limit.interval), repr(limit.depth)]
            else:
                args += ["q", str(limit.count), repr(limit.reset_at)]
        try:
            reply = await self._call(defer.ensureDeferred(
                self._evalsha(keys, args, _TOKEN_SHA, _TOKEN_BYTES)))
        except defer.TimeoutError:
            raise RedisUnavailable(f"no answer within {self.settings.timeout * 1000:g} ms") from None
        except Exception as e:
            self._heal()
            raise RedisUnavailable(f"{type(e).__name__}: {e}") from None
        try:
            return _decision(_text(reply), now, budgets, None)
        except (ValueError, IndexError):
            raise RedisUnavailable(f"unexpected reply from the token script: {reply!r:.80}") from None

    def _submit(self, keys: list[str], args: str) -> defer.Deferred[str]:
        """Queue one request's decision for the next batch (sent at the end of this reactor turn)."""
        d: defer.Deferred[str] = defer.Deferred()
        self._pending.append((keys, args, d))
        if len(self._pending) >= MAX_BATCH:
            self._flush()
        elif self._flush_call is None:
            self._flush_call = self.reactor.callLater(0, self._flush)
        return d

    def _flush(self) -> None:
        if self._flush_call is not None:
            if self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None
        batch, self._pending = self._pending, []
        if not batch:
            return
        keys = [key for item in batch for key in item[0]]
        keys.append(CLOCK)
        call = self._call(defer.ensureDeferred(self._evalsha(keys, [";".join(item[1] for item in batch)])))
        call.addCallbacks(self._deliver, self._failed, callbackArgs=(batch,), errbackArgs=(batch,))

    def _deliver(self, reply: Any, batch: list[_Pending]) -> None:
        answers = _text(reply).split(";")
        if len(answers) != len(batch):
            # Not one answer per request (not our script?): which answer is whose cannot be known.
            error = RedisUnavailable(f"unexpected reply from the script: {reply!r:.80}")
            for _, _, d in batch:
                if not d.called:
                    d.errback(error)
            return
        for (_, _, d), answer in zip(batch, answers, strict=True):
            if not d.called:  # a request already timed out (or went away) is not answered twice
                d.callback(answer)

    def _failed(self, failure: Any, batch: list[_Pending]) -> None:
        if failure.check(defer.TimeoutError):
            error = RedisUnavailable(f"no answer within {self.settings.timeout * 1000:g} ms")
        else:
            self._heal()
            error = RedisUnavailable(f"{failure.type.__name__}: {failure.value}")
        for _, _, d in batch:
            if not d.called:
                d.errback(error)

    async def _evalsha(self, keys: list[str], args: list[str], sha: str = _SHA,
                       script: bytes = _SCRIPT_BYTES) -> Any:
        """EVALSHA; the script itself only when Redis does not know it (first use, restart)."""
        try:
            return await self._pool.evalsha(sha, keys, args)
        except Exception as e:
            if type(e).__name__ != "ScriptDoesNotExist":
                raise
        return await self._pool.eval(script, keys, args)

    async def active_blocks(self, now: float) -> list[tuple[str, float]]:
        """Every address blocked by any instance, with the end of its block."""
        rows = await self._query(self._pool and self._pool.zrangebyscore(BLOCKS, f"({now!r}", "+inf", withscores=True))
        return [(_text(ip), float(score)) for ip, score in rows]

    async def blocks_made_since(self, since: float) -> list[tuple[str, float, float]]:
        """The blocks made at or after `since` (kept two minutes), as (target, until, made), in the
        order they were made: what a poll needs, however many addresses are blocked in all."""
        rows = await self._query(self._pool and self._pool.zrangebyscore(BLOCKS_MADE, repr(since), "+inf",
                                                                         withscores=True))
        out = []
        for row, made in rows:
            ip, _, until = _text(row).rpartition(" ")
            out.append((ip, float(until), float(made)))
        return out

    async def share_block(self, target: str, until: float | None, now: float) -> None:
        """Publish an operator's or an alert rule's block (an address or a range) to every
        instance, as the script publishes automatic blocks; `until` None lifts any block of
        `target`, automatic ones included. Polling instances apply both within a second."""
        if until is None:
            await self._query(self._pool and self._pool.delete(PREFIX + "block:" + target))
            await self._query(self._pool and self._pool.zrem(BLOCKS, target))
            await self._query(self._pool and self._pool.zadd(BLOCKS_MADE, now, f"{target} {LIFTED}"))
            return
        until = min(until, now + _FOREVER)  # "until unblocked" is ten years to Redis
        if "/" not in target:  # the script refuses a single address by itself
            ms = max(1, int((until - now) * 1000))
            await self._query(self._pool and self._pool.set(PREFIX + "block:" + target, repr(until), pexpire=ms))
        await self._query(self._pool and self._pool.zadd(BLOCKS, until, target))
        await self._query(self._pool and self._pool.zadd(BLOCKS_MADE, now, f"{target} {until!r}"))

    async def get_shared(self, name: str) -> str | None:
        """A small shared value (`ccproxy:rl:shared:<name>`), e.g. the emergency switch."""
        value = await self._query(self._pool and self._pool.get(PREFIX + "shared:" + name))
        return None if value is None else _text(value)

    async def set_shared(self, name: str, value: str) -> None:
        await self._query(self._pool and self._pool.set(PREFIX + "shared:" + name, value))

    async def _query(self, call: defer.Deferred[Any] | None) -> Any:
        if call is None:
            raise RedisUnavailable("not connected")
        try:
            return await self._call(call)
        except defer.TimeoutError:
            raise RedisUnavailable(f"no answer within {self.settings.timeout * 1000:g} ms") from None
        except Exception as e:
            raise RedisUnavailable(f"{type(e).__name__}: {e}") from None

    def stop(self) -> Any:
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        pending, self._pending = self._pending, []
        for _, _, d in pending:
            if not d.called:
                d.errback(RedisUnavailable("stopped"))
        pool, self._pool = self._pool, None
        if pool is not None:
            return pool.disconnect()
        return None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _decision(reply: str, now: float, limits: list[Limit], probe: AutoBlockProbe | None) -> Decision:
    fields = reply.split()
    status = int(fields[0])
    if status in (2, 3):
        until = float(fields[1])
        wait = max(0.0, until - now)
        rate = probe.rate if probe is not None else None
        return Decision(False, rate, 0, wait, wait, blocked_until=until, new_block=status == 3)
    outcomes = []
    for i in range(len(limits)):
        allowed, remaining, reset_after, retry_after = fields[1 + 4 * i : 5 + 4 * i]
        outcomes.append(Outcome(allowed == "1", int(remaining), float(reset_after), float(retry_after), 0.0))
    return combine(limits, outcomes)
