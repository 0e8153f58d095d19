"""`Records` in Redis: a hash per collection, a counter and a sequence beside it.

A swap is one Lua script (Redis runs it atomically): compare the field, write or delete it, and
increment the collection's counter, so no reader sees a change without its counter having moved.
Keys: `<prefix>records:<collection>` (the hash), `<prefix>records-version:<collection>`,
`<prefix>records-seq:<collection>`. Records are not given an expiry: Redis must persist them
(AOF or RDB), as it must for anything it is trusted with.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis
from redis.exceptions import RedisError

from bastion.records import Guard, target

# ARGV: field, has old ('1'/'0'), old, has new, new.
_SWAP = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if ARGV[2] == '1' then
  if current ~= ARGV[3] then return 0 end
elseif current then
  return 0
end
if ARGV[4] == '1' then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[5])
elseif current then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  return 0
end
redis.call('INCR', KEYS[2])
return 1
"""


class RedisRecords:
    """Thread-safe (redis-py's connection pool); every call runs through a `Guard` (a worker thread,
    a `DEADLINE` for the caller), so a Redis that accepts and never answers costs the event loop at
    most the deadline, once per outage. The socket timeout ends an abandoned call soon after."""

    def __init__(self, url: str, *, prefix: str = "bastion:", timeout: float = 0.5, source: str = "") -> None:
        self._prefix = prefix
        self._client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self._swap = self._client.register_script(_SWAP)
        self.guard = Guard(source or f"redis {target(url)}", (RedisError,), self._client.ping)

    def _call(self, run: Callable[[], Any]) -> Any:
        return self.guard.run(lambda _ticket: run())

    def _hash(self, collection: str) -> str:
        return f"{self._prefix}records:{collection}"

    def get(self, collection: str, key: str) -> str | None:
        value = self._call(lambda: self._client.hget(self._hash(collection), key))
        return None if value is None else bytes(value).decode()

    def items(self, collection: str) -> dict[str, str]:
        raw = self._call(lambda: self._client.hgetall(self._hash(collection)))
        return {bytes(k).decode(): bytes(v).decode() for k, v in raw.items()}

    def swap(self, collection: str, key: str, old: str | None, new: str | None) -> bool:
        keys = [self._hash(collection), f"{self._prefix}records-version:{collection}"]
        args = [key, "1" if old is not None else "0", old or "", "1" if new is not None else "0", new or ""]
        return bool(self._call(lambda: self._swap(keys=keys, args=args)))

    def version(self, collection: str) -> int:
        value = self._call(lambda: self._client.get(f"{self._prefix}records-version:{collection}"))
        return 0 if value is None else int(value)

    def next_id(self, collection: str) -> int:
        return int(self._call(lambda: self._client.incr(f"{self._prefix}records-seq:{collection}")))

    def reachable(self) -> bool:
        """Whether Redis answers now, within the deadline (False at once while marked down)."""
        try:
            return bool(self._call(self._client.ping))
        except Exception:  # StateUnavailable: not reachable
            return False

    def close(self) -> None:
        self.guard.close()
        self._client.close()
