"""The shared state stores against real servers (Redis, PostgreSQL): the same answers as the memory
store in one process, never over the limit across processes (replicas), nothing lost on a clean
shutdown, and closed to requests when the server is gone."""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Callable, Iterator

import pytest

from bastion.errors import StateUnavailable
from bastion.state import DAY, LeasedStateStore, LimitSpec, MemoryStateStore
from bastion.state_postgres import PostgresStateStore
from bastion.state_redis import RedisStateStore
from tests.helpers import (
    POSTGRES_DSN,
    REDIS_URL,
    drop_postgres_table,
    drop_redis_keys,
    postgres_table,
    redis_prefix,
)

SPEC = LimitSpec(rate=1.0, burst=3, daily_quota=5)
Factory = Callable[[], LeasedStateStore]


def _factory(backend: str, namespace: str) -> Factory:
    if backend == "redis":
        return lambda: RedisStateStore(REDIS_URL, prefix=namespace)
    return lambda: PostgresStateStore(POSTGRES_DSN, table=namespace)


@pytest.fixture(params=["redis", "postgres"])
def backend(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    """(backend, namespace): a key prefix or a table no other test shares, removed afterwards."""
    if request.param == "redis":
        prefix = redis_prefix()
        yield "redis", prefix
        drop_redis_keys(prefix)
    else:
        table = postgres_table()
        yield "postgres", table
        drop_postgres_table(table)


def test_limits_match_the_memory_store_step_by_step(backend: tuple[str, str]) -> None:
    times = [1000.0, 1000.0, 1000.0, 1000.0, 1000.0, 1000.5, 1001.0, 1002.0, 1010.0, DAY + 1.0, DAY + 1.2]

    async def run() -> None:
        shared, memory = _factory(*backend)(), MemoryStateStore()
        for t in times:
            got = await shared.acquire("p", SPEC, now=t)
            want = await memory.acquire("p", SPEC, now=t)
            assert (got.allowed, got.reason, got.quota_remaining) == (
                want.allowed,
                want.reason,
                want.quota_remaining,
            )
            assert got.retry_after == pytest.approx(want.retry_after)
        await shared.aclose()

    asyncio.run(run())


def _replica(backend: str, namespace: str, queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    async def run() -> tuple[int, int]:
        store = _factory(backend, namespace)()
        answers = [
            await store.spend_budget("shared", cost=0.5, limit=200.0, now=5.0, window_seconds=100)
            for _ in range(150)
        ]
        admitted = [await store.acquire("shared", LimitSpec(1e6, 10**6, 150), now=500.0) for _ in range(100)]
        await store.aclose()  # gives back what it still holds
        return sum(a.allowed for a in answers), sum(a.allowed for a in admitted)

    queue.put(asyncio.run(run()))


def test_replicas_never_pass_the_limits_and_give_back_what_they_hold(backend: tuple[str, str]) -> None:
    """Four processes lease from one budget (400 answers) and one quota (150) in blocks: together they
    never pass either, and once they have shut down what is left is exactly the rest."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_replica, args=(*backend, queue)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    answered, admitted = sum(r[0] for r in results), sum(r[1] for r in results)
    assert answered <= 400 and admitted <= 150

    async def rest() -> tuple[int, int]:
        store = _factory(*backend)()
        more = [
            await store.spend_budget("shared", cost=0.5, limit=200.0, now=6.0, window_seconds=100)
            for _ in range(500)
        ]
        extra = [await store.acquire("shared", LimitSpec(1e6, 10**6, 150), now=501.0) for _ in range(200)]
        await store.aclose()
        return sum(m.allowed for m in more), sum(e.allowed for e in extra)

    more, extra = asyncio.run(rest())
    assert answered + more == 400 and admitted + extra == 150


def test_one_worker_spends_a_large_budget_exactly(backend: tuple[str, str]) -> None:
    async def run() -> list[bool]:
        store = _factory(*backend)()
        got = [
            (await store.spend_budget("p", cost=0.25, limit=100.0, now=1.0, window_seconds=100)).allowed
            for _ in range(420)
        ]
        await store.aclose()
        return got

    assert asyncio.run(run()) == [True] * 400 + [False] * 20


@pytest.mark.parametrize(
    "make",
    [
        lambda: RedisStateStore("redis://127.0.0.1:9/0", timeout=0.5),  # nothing listens on port 9
        lambda: PostgresStateStore("postgresql://postgres@127.0.0.1:9/postgres"),
    ],
    ids=["redis", "postgres"],
)
def test_an_unreachable_server_refuses_instead_of_answering(make: Factory) -> None:
    async def run() -> None:
        store = make()
        with pytest.raises(StateUnavailable):
            await store.spend_budget("p", cost=1.0, limit=10.0, now=1.0, window_seconds=10)
        with pytest.raises(StateUnavailable):
            await store.acquire("p", SPEC, now=1.0)
        assert await store.reachable() is False
        await store.aclose()

    asyncio.run(run())


def test_redis_keys_expire_with_their_window() -> None:
    import redis

    prefix = redis_prefix()

    async def run() -> None:
        store = RedisStateStore(REDIS_URL, prefix=prefix)
        await store.spend_budget("p", cost=1.0, limit=10.0, now=1000.0, window_seconds=100)
        await store.acquire("p", SPEC, now=1000.0)
        assert await store.reachable() is True
        await store.aclose()

    asyncio.run(run())
    client = redis.Redis.from_url(REDIS_URL)
    assert 0 < client.ttl(f"{prefix}privacy_budget:p") <= 100 + 60  # the rest of the window, and a minute
    assert 0 < client.ttl(f"{prefix}quota:p") <= 2 * DAY + 60
    client.close()
    drop_redis_keys(prefix)
