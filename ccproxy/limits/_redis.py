"""Limits shared by every ccproxy instance through one Redis: one Lua script per request.

The script does what `MemoryStore.decide` does, atomically inside Redis, with the caller's clock
passed in (so instances agree as far as their clocks do, and tests stay deterministic). Blocks live
in Redis as `block:<ip>` keys (refused by the script on every instance) and in the sorted set
`blocks` (ip by end time) that every instance polls to refuse blocked addresses at accept.

txredisapi is imported inside `connect()` only: importing it installs the default reactor, which
must not happen while twistd is still choosing one.
"""

from __future__ import annotations

import hashlib
from typing import Any

from twisted.internet import defer

from ccproxy.config.limits import RedisState
from ccproxy.limits._core import Decision, Limit, Outcome, Rate, combine
from ccproxy.limits._plan import AutoBlockProbe

PREFIX = "ccproxy:rl:"
BLOCKS = PREFIX + "blocks"
# Keys outlive their meaning by this margin: harmless, and an injected test clock may run slower
# than Redis's own.
_MARGIN_MS = 60_000

# KEYS: block key, blocks zset, auto-block key ('' slot if none), then one key per limit.
# ARGV: one string, space-separated (one argument encodes far faster in txredisapi than 30):
#       now, ip, probe(0|1), probe interval, probe depth, block duration, margin, then per limit:
#       kind ('r'|'q'), interval|count, depth|reset_at.
# Returns one string (one bulk reply parses far faster than an array): "status until" for a block
# (status 2: already blocked, 3: blocked now), or "1|0" then per limit "allowed remaining
# reset_after retry_after", space-separated.
SCRIPT = """
local A = {}
for word in string.gmatch(ARGV[1], '%S+') do A[#A + 1] = word end
local now = tonumber(A[1])
local margin = tonumber(A[7])
local function f(x) return string.format('%.17g', x) end
local blocked = redis.call('GET', KEYS[1])
if blocked and tonumber(blocked) > now then
  return '2 ' .. blocked
end
local function gcra(key, interval, depth)
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
if A[3] == '1' then
  local o = gcra(KEYS[3], tonumber(A[4]), tonumber(A[5]))
  if o[1] == 0 then
    local until_ = now + tonumber(A[6])
    local ms = math.ceil(tonumber(A[6]) * 1000)
    redis.call('SET', KEYS[1], f(until_), 'PX', ms)
    redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', f(now))
    redis.call('ZADD', KEYS[2], f(until_), A[2])
    redis.call('DEL', KEYS[3])
    return '3 ' .. f(until_)
  end
  redis.call('SET', KEYS[3], f(o[5]), 'PX', math.ceil(o[3] * 1000) + margin)
end
local out = {1}
local new = {}
local ok = true
local n = (#A - 7) / 3
for i = 1, n do
  local kind, a, b = A[5 + 3 * i], tonumber(A[6 + 3 * i]), tonumber(A[7 + 3 * i])
  local key = KEYS[3 + i]
  local o
  if kind == 'r' then
    o = gcra(key, a, b)
  else
    local used = tonumber(redis.call('GET', key) or '0')
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
  local ttl = new[i][3]
  redis.call('SET', KEYS[3 + i], f(new[i][5]), 'PX', math.ceil(ttl * 1000) + margin)
end
return table.concat(out, ' ')
"""


_SCRIPT_BYTES = SCRIPT.encode()
_SHA = hashlib.sha1(_SCRIPT_BYTES).hexdigest()


class RedisUnavailable(Exception):
    """Redis did not answer in time or at all."""


class RedisStore:
    def __init__(self, settings: RedisState, reactor: Any) -> None:
        self.settings = settings
        self.reactor = reactor
        self._pool: Any = None

    def connect(self) -> None:
        import txredisapi  # lazily: see the module docstring

        s = self.settings
        self._pool = txredisapi.lazyConnectionPool(
            host=s.host,
            port=s.port,
            # db 0 needs no SELECT: one handshake step fewer that could fail (see `_heal`).
            dbid=s.db or None,
            poolsize=4,
            reconnect=True,
            password=s.password.reveal() if s.password else None,
            connectTimeout=max(1.0, s.timeout),
            # A connection silent this long is dropped and made again.
            replyTimeout=max(1.0, 10 * s.timeout),
        )
        # A handshake cut short fails this Deferred; the outage is reported by the requests.
        self._pool._connected.addErrback(lambda _: None)

    def _heal(self) -> None:
        """txredisapi gives up for good when a connection drops between connect and AUTH/SELECT
        (Redis dying or restarting at that moment): start a new pool then."""
        pool = self._pool
        if pool is not None and pool._factory.stopped:
            self._pool = None
            if not pool._factory.disconnectCalled:
                defer.maybeDeferred(pool.disconnect).addErrback(lambda _: None)
            self.connect()

    def _call(self, d: defer.Deferred[Any]) -> defer.Deferred[Any]:
        return d.addTimeout(self.settings.timeout, self.reactor)

    async def decide(
        self, now: float, limits: list[Limit], probe: AutoBlockProbe | None = None, ip: str = ""
    ) -> Decision:
        ip = probe.ip if probe is not None else ip
        keys = [PREFIX + "block:" + ip, BLOCKS, PREFIX + (probe.rate.key if probe else "none")]
        # Never empty and never with a space: the arguments travel as one space-separated string.
        args: list[str] = [repr(now), "".join(ip.split()) or "-"]
        if probe is not None:
            args += ["1", repr(probe.rate.interval), repr(probe.rate.depth), repr(probe.duration)]
        else:
            args += ["0", "0", "0", "0"]
        args.append(str(_MARGIN_MS))
        for limit in limits:
            keys.append(PREFIX + limit.key)
            if isinstance(limit, Rate):
                args += ["r", repr(limit.interval), repr(limit.depth)]
            else:
                args += ["q", str(limit.count), repr(limit.reset_at)]
        reply = await self._eval(keys, [" ".join(args)])
        return _decision(reply, now, limits, probe)

    async def _eval(self, keys: list[str], args: list[str]) -> Any:
        if self._pool is None:
            raise RedisUnavailable("not connected")
        try:
            return await self._call(defer.ensureDeferred(self._evalsha(keys, args)))
        except defer.TimeoutError:
            raise RedisUnavailable(f"no answer within {self.settings.timeout * 1000:g} ms") from None
        except Exception as e:  # txredisapi raises its own connection and protocol errors
            self._heal()
            raise RedisUnavailable(f"{type(e).__name__}: {e}") from None

    async def _evalsha(self, keys: list[str], args: list[str]) -> Any:
        """EVALSHA; the script itself only when Redis does not know it (first use, restart)."""
        try:
            return await self._pool.evalsha(_SHA, keys, args)
        except Exception as e:
            if type(e).__name__ != "ScriptDoesNotExist":
                raise
        return await self._pool.eval(_SCRIPT_BYTES, keys, args)

    async def active_blocks(self, now: float) -> list[tuple[str, float]]:
        """Every address blocked by any instance, with the end of its block."""
        if self._pool is None:
            raise RedisUnavailable("not connected")
        try:
            rows = await self._call(self._pool.zrangebyscore(BLOCKS, f"({now!r}", "+inf", withscores=True))
        except defer.TimeoutError:
            raise RedisUnavailable(f"no answer within {self.settings.timeout * 1000:g} ms") from None
        except Exception as e:
            raise RedisUnavailable(f"{type(e).__name__}: {e}") from None
        return [(_text(ip), float(score)) for ip, score in rows]

    def stop(self) -> Any:
        pool, self._pool = self._pool, None
        if pool is not None:
            return pool.disconnect()
        return None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _decision(reply: Any, now: float, limits: list[Limit], probe: AutoBlockProbe | None) -> Decision:
    fields = _text(reply).split()
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
