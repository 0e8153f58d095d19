"""The Redis state store against a real Redis server: the same answers as the memory store in one
process, never over the limit across processes (replicas), nothing lost on a clean shutdown, and
closed to requests when Redis is gone."""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Iterator

import pytest

from bastion.errors import StateUnavailable
from bastion.state import DAY, LimitSpec, MemoryStateStore
from bastion.state_redis import RedisStateStore
from tests.helpers import REDIS_URL, drop_redis_keys, redis_prefix

SPEC = LimitSpec(rate=1.0, burst=3, daily_quota=5)


@pytest.fixture
def prefix() -> Iterator[str]:
    name = redis_prefix()
    yield name
    drop_redis_keys(name)


def test_limits_match_the_memory_store_step_by_step(prefix: str) -> None:
    times = [1000.0, 1000.0, 1000.0, 1000.0, 1000.0, 1000.5, 1001.0, 1002.0, 1010.0, DAY + 1.0, DAY + 1.2]

    async def run() -> None:
        redis_store, memory = RedisStateStore(REDIS_URL, prefix=prefix), MemoryStateStore()
        for t in times:
            got = await redis_store.acquire("p", SPEC, now=t)
            want = await memory.acquire("p", SPEC, now=t)
            assert (got.allowed, got.reason, got.quota_remaining) == (
                want.allowed,
                want.reason,
                want.quota_remaining,
            )
            assert got.retry_after == pytest.approx(want.retry_after)
        await redis_store.aclose()

    asyncio.run(run())


def _replica(prefix: str, queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    async def run() -> tuple[int, int]:
        store = RedisStateStore(REDIS_URL, prefix=prefix)
        answers = [
            await store.spend_budget("shared", cost=0.5, limit=200.0, now=5.0, window_seconds=100)
            for _ in range(150)
        ]
        admitted = [await store.acquire("shared", LimitSpec(1e6, 10**6, 150), now=500.0) for _ in range(100)]
        await store.aclose()  # gives back what it still holds
        return sum(a.allowed for a in answers), sum(a.allowed for a in admitted)

    queue.put(asyncio.run(run()))


def test_replicas_never_pass_the_limits_and_give_back_what_they_hold(prefix: str) -> None:
    """Four processes lease from one budget (400 answers) and one quota (150) in blocks: together they
    never pass either, and once they have shut down what is left is exactly the rest."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_replica, args=(prefix, queue)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    answered, admitted = sum(r[0] for r in results), sum(r[1] for r in results)
    assert answered <= 400 and admitted <= 150

    async def rest() -> tuple[int, int]:
        store = RedisStateStore(REDIS_URL, prefix=prefix)
        more = [
            await store.spend_budget("shared", cost=0.5, limit=200.0, now=6.0, window_seconds=100)
            for _ in range(500)
        ]
        extra = [await store.acquire("shared", LimitSpec(1e6, 10**6, 150), now=501.0) for _ in range(200)]
        await store.aclose()
        return sum(m.allowed for m in more), sum(e.allowed for e in extra)

    more, extra = asyncio.run(rest())
    assert answered + more == 400 and admitted + extra == 150


def test_one_worker_spends_a_large_budget_exactly(prefix: str) -> None:
    async def run() -> list[bool]:
        store = RedisStateStore(REDIS_URL, prefix=prefix)
        got = [
            (await store.spend_budget("p", cost=0.25, limit=100.0, now=1.0, window_seconds=100)).allowed
            for _ in range(420)
        ]
        await store.aclose()
        return got

    assert asyncio.run(run()) == [True] * 400 + [False] * 20


def test_an_unreachable_redis_refuses_instead_of_answering() -> None:
    async def run() -> None:
        store = RedisStateStore("redis://127.0.0.1:9/0", timeout=0.5)  # nothing listens on port 9
        with pytest.raises(StateUnavailable):
            await store.spend_budget("p", cost=1.0, limit=10.0, now=1.0, window_seconds=10)
        with pytest.raises(StateUnavailable):
            await store.acquire("p", SPEC, now=1.0)
        await store.aclose()

    asyncio.run(run())


def test_keys_expire_with_their_window(prefix: str) -> None:
    import redis

    async def run() -> None:
        store = RedisStateStore(REDIS_URL, prefix=prefix)
        await store.spend_budget("p", cost=1.0, limit=10.0, now=1000.0, window_seconds=100)
        await store.acquire("p", SPEC, now=1000.0)
        await store.aclose()

    asyncio.run(run())
    client = redis.Redis.from_url(REDIS_URL)
    assert 0 < client.ttl(f"{prefix}privacy_budget:p") <= 100 + 60  # the rest of the window, and a minute
    assert 0 < client.ttl(f"{prefix}quota:p") <= 2 * DAY + 60
    client.close()
