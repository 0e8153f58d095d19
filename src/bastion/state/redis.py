"""Quotas and privacy budgets in Redis: one ledger for every replica, on every host.

`RedisLedger` is the `Ledger` of `bastion.state.leased.LeasedStateStore` kept in Redis:
taking a block is one Lua script, which Redis runs atomically, so however many
servers lease at once the total never passes the limit. Workers spend their
blocks in memory (measured: one redis-py round trip per request cost ~160 us of
CPU on the request path, bench/RESULTS.md), so a small budget or quota is still
spent exactly, answer by answer, and a large one costs a round trip per block.
Keys expire with their day or window, so Redis holds only live totals.

A Redis that cannot be reached fails closed: the request gets 503
`state_unavailable` and is not answered.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from bastion.records import target
from bastion.state.base import BUDGET_SLACK, unavailable
from bastion.state.leased import Book, LeasedStateStore, Return

log = logging.getLogger("bastion.state")

# The same arithmetic as bastion.state.leased.block_size. Numbers cross as strings with 17 significant
# digits (a Lua number in a reply would be truncated to an integer).
_TAKE = """
local period, limit, need = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local cap, ttl, slack = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local v = redis.call('HMGET', KEYS[1], 'period', 'taken')
local taken = 0
if v[1] and tonumber(v[1]) == period then taken = tonumber(v[2]) end
local left = limit - taken
if left < need - slack then
  return {'0', string.format('%.17g', math.max(0, left))}
end
local amount = math.min(left, math.max(need, math.min(cap, math.floor(left / 8))))
redis.call('HSET', KEYS[1], 'period', period, 'taken', string.format('%.17g', taken + amount))
redis.call('EXPIRE', KEYS[1], math.ceil(ttl) + 60)
return {string.format('%.17g', amount), string.format('%.17g', left - amount)}
"""

_GIVE_BACK = """
local v = redis.call('HMGET', KEYS[1], 'period', 'taken')
if v[1] and tonumber(v[1]) == tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'taken', string.format('%.17g', tonumber(v[2]) - tonumber(ARGV[2])))
end
return 0
"""


class RedisLedger:
    def __init__(self, url: str, *, prefix: str = "bastion:", timeout: float = 1.0) -> None:
        self._url, self._prefix, self._timeout = url, prefix, timeout
        self._source = f"state.redis_url, {target(url)}"
        # Connections are made on first use, on the event loop that uses them.
        self._client = aioredis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self._take: AsyncScript = self._client.register_script(_TAKE)

    def _key(self, book: Book, principal: str) -> str:
        return f"{self._prefix}{book.name}:{principal}"

    async def take(
        self, book: Book, principal: str, period: int, *, limit: float, need: float, cap: float, ttl: float
    ) -> tuple[float, float]:
        args = [period, limit, need, cap, ttl, BUDGET_SLACK]
        taken, left = await self._call(
            self._take(keys=[self._key(book, principal)], args=[_text(a) for a in args])
        )
        return float(taken), float(left)

    async def left(self, book: Book, principal: str, period: int, *, limit: float) -> float:
        stored, taken = await self._call(self._client.hmget(self._key(book, principal), ["period", "taken"]))
        return limit - (float(taken) if stored is not None and int(stored) == period else 0.0)

    async def _call(self, pending: Any) -> Any:
        try:
            return await pending
        except RedisError as e:
            raise unavailable(e, self._source) from None

    def give_back(self, returns: list[Return]) -> None:
        if not returns:
            return
        # At shutdown, perhaps with no event loop left: a short-lived blocking client.
        try:
            with redis.Redis.from_url(self._url, socket_timeout=self._timeout) as client:
                pipe = client.pipeline(transaction=False)
                for book, principal, period, amount in returns:
                    pipe.eval(_GIVE_BACK, 1, self._key(book, principal), str(period), _text(amount))
                pipe.execute()
        except RedisError as e:  # the blocks are forfeited: under-serving, never over-serving
            log.warning("could not return leased blocks to Redis: %s", type(e).__name__)

    def close(self) -> None:
        """Nothing to flush; `aclose` releases the connections on their event loop."""

    async def aclose(self) -> None:
        await self._client.aclose()

    async def reachable(self) -> bool:
        # Readiness probes come every few seconds: one PING each, bounded by the socket timeout.
        try:
            return bool(await self._client.ping())
        except RedisError:
            return False


class RedisStateStore(LeasedStateStore):
    """Quotas and privacy budgets shared by replicas on any number of hosts."""

    def __init__(self, url: str, *, prefix: str = "bastion:", timeout: float = 1.0) -> None:
        super().__init__(RedisLedger(url, prefix=prefix, timeout=timeout))


def _text(value: float) -> str:
    """An exact decimal string (repr round-trips a float); a non-finite number is a bug upstream."""
    if not math.isfinite(value):
        raise ValueError(f"not a finite number: {value}")
    return repr(float(value)) if isinstance(value, float) else str(value)
