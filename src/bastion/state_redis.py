"""Rate limits, quotas and privacy budgets in Redis: shared by every replica, on every host.

Each decision is one Lua script, which Redis runs atomically: the token bucket and
the daily quota are checked and consumed together, and a privacy budget is spent
or refused, exactly, whatever number of servers ask at once. The arithmetic is
the same as `bastion.state.admit` and `bastion.state.spend` (tests hold the three
stores to the same answers). Keys expire after their day or window, so Redis
holds only live state.

A Redis that cannot be reached fails closed: the request gets 503
`state_unavailable` and is not answered.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from bastion.errors import StateUnavailable
from bastion.state import _EPSILON_SLACK, DAY, Admission, BudgetSpend, LimitSpec

log = logging.getLogger("bastion.state")

# Lua numbers round-trip through strings with 17 significant digits (a reply would truncate them).
_ACQUIRE = """
local rate, burst, quota = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local now, cost, day_seconds = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local today = math.floor(now / day_seconds)
local v = redis.call('HMGET', KEYS[1], 'tokens', 'updated', 'day', 'used')
local tokens, updated, day, used = burst, now, today, 0
if v[1] then
  tokens, updated, day, used = tonumber(v[1]), tonumber(v[2]), tonumber(v[3]), tonumber(v[4])
end
tokens = math.min(burst, tokens + math.max(0, now - updated) * rate)
if day ~= today then used = 0 end
local allowed, reason, retry = 0, '', 0
if used + cost > quota then
  reason, retry = 'quota_exhausted', (today + 1) * day_seconds - now
elseif tokens < cost then
  reason, retry = 'rate_limited', (cost - tokens) / rate
else
  allowed, tokens, used = 1, tokens - cost, used + cost
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'updated', string.format('%.17g', now),
           'day', today, 'used', used)
redis.call('EXPIRE', KEYS[1], math.ceil(2 * day_seconds))
return {allowed, reason, string.format('%.17g', retry), quota - used}
"""

_SPEND = """
local cost, limit, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local window_seconds, slack = tonumber(ARGV[4]), tonumber(ARGV[5])
local current = math.floor(now / window_seconds)
local v = redis.call('HMGET', KEYS[1], 'window', 'spent')
local used = 0
if v[1] and tonumber(v[1]) == current then used = tonumber(v[2]) end
local ends = (current + 1) * window_seconds
if used + cost > limit + slack then
  return {0, string.format('%.17g', math.max(0, limit - used)), string.format('%.17g', ends - now)}
end
redis.call('HSET', KEYS[1], 'window', current, 'spent', string.format('%.17g', used + cost))
redis.call('EXPIRE', KEYS[1], math.ceil(ends - now) + 60)
return {1, string.format('%.17g', limit - used - cost), '0'}
"""


class RedisStateStore:
    """Exact and shared: one round trip to Redis per decision, no lease held anywhere."""

    def __init__(self, url: str, *, prefix: str = "bastion:", timeout: float = 1.0) -> None:
        # Connections are made on first use, on the event loop that uses them.
        self._client = aioredis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self._prefix = prefix
        self._acquire = self._client.register_script(_ACQUIRE)
        self._spend = self._client.register_script(_SPEND)

    async def acquire(self, principal: str, spec: LimitSpec, *, now: float, cost: int = 1) -> Admission:
        reply = await self._run(
            self._acquire,
            f"{self._prefix}limits:{principal}",
            spec.rate,
            spec.burst,
            spec.daily_quota,
            now,
            cost,
            DAY,
        )
        allowed, reason, retry, remaining = reply
        return Admission(bool(allowed), reason.decode() or None, float(retry), int(remaining))

    async def spend_budget(
        self, principal: str, *, cost: float, limit: float, now: float, window_seconds: float
    ) -> BudgetSpend:
        reply = await self._run(
            self._spend,
            f"{self._prefix}budget:{principal}",
            cost,
            limit,
            now,
            window_seconds,
            _EPSILON_SLACK,
        )
        allowed, remaining, retry = reply
        return BudgetSpend(bool(allowed), float(remaining), float(retry))

    async def _run(self, script: AsyncScript, key: str, *args: float) -> list[Any]:
        try:
            reply: list[Any] = await script(keys=[key], args=[_number(a) for a in args])
        except RedisError as e:
            log.error("state store unavailable: %s", type(e).__name__)
            raise StateUnavailable(
                "rate-limit and privacy-budget state unavailable; nothing was answered"
            ) from None
        return reply

    def close(self) -> None:
        """Nothing to flush: every decision is already in Redis. `aclose` releases the connections."""

    async def aclose(self) -> None:
        await self._client.aclose()


def _number(value: float) -> str:
    """Arguments as exact decimal strings (repr round-trips a float); infinity is refused early."""
    if not math.isfinite(value):
        raise ValueError(f"not a finite number: {value}")
    return repr(float(value)) if isinstance(value, float) else str(value)
