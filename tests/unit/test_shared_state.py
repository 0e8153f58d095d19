"""The shared state stores against real servers (Redis, PostgreSQL): the same answers as the memory
store in one process, never over the limit across processes (replicas), nothing lost on a clean
shutdown, and closed to requests when the server is gone."""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bastion.errors import StateUnavailable
from bastion.state import (
    DAY,
    EVERYONE,
    BudgetKey,
    LeasedStateStore,
    LimitSpec,
    MemoryStateStore,
    SQLiteStateStore,
)
from bastion.state.postgres import PostgresStateStore
from bastion.state.redis import RedisStateStore
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
            await store.spend_budget(BudgetKey("shared", "m/epsilon", 100), cost=0.5, limit=200.0, now=5.0)
            for _ in range(150)
        ]
        admitted = [await store.acquire("shared", LimitSpec(1e6, 10**6, 150), now=500.0) for _ in range(100)]
        await store.aclose()  # gives back what it still holds
        return sum(a.allowed for a in answers), sum(a.allowed for a in admitted)

    queue.put(asyncio.run(run()))


@pytest.mark.slow
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
            await store.spend_budget(BudgetKey("shared", "m/epsilon", 100), cost=0.5, limit=200.0, now=6.0)
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
            (
                await store.spend_budget(BudgetKey("p", "m/epsilon", 100), cost=0.25, limit=100.0, now=1.0)
            ).allowed
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
            await store.spend_budget(BudgetKey("p", "m/epsilon", 10), cost=1.0, limit=10.0, now=1.0)
        with pytest.raises(StateUnavailable):
            await store.acquire("p", SPEC, now=1.0)
        assert await store.reachable() is False
        await store.aclose()

    asyncio.run(run())


ROW = BudgetKey.for_model("key:p", "m", "epsilon", 100)


def test_redis_keys_expire_with_their_window() -> None:
    import redis

    prefix = redis_prefix()

    async def run() -> None:
        store = RedisStateStore(REDIS_URL, prefix=prefix)
        await store.spend_budget(ROW, cost=1.0, limit=10.0, now=1000.0)
        await store.acquire("p", SPEC, now=1000.0)
        assert await store.reachable() is True
        await store.aclose()

    asyncio.run(run())
    client = redis.Redis.from_url(REDIS_URL)
    assert (
        0 < client.ttl(f"{prefix}privacy_budget:{ROW.render()}") <= 100 + 60
    )  # the rest of the window, and a minute
    assert 0 < client.ttl(f"{prefix}quota:p") <= 2 * DAY + 60
    client.close()
    drop_redis_keys(prefix)


@pytest.fixture(params=["memory", "sqlite", "redis", "postgres"])
def any_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Factory | Callable[[], MemoryStateStore]]:
    """A factory of stores over one ledger, for every backend (memory: one store, shared)."""
    if request.param == "memory":
        memory = MemoryStateStore()
        yield lambda: memory
    elif request.param == "sqlite":
        yield lambda: SQLiteStateStore(tmp_path / "limits.db")
    else:
        name = redis_prefix() if request.param == "redis" else postgres_table()
        yield _factory(request.param, name)
        if request.param == "redis":
            drop_redis_keys(name)
        else:
            drop_postgres_table(name)


def test_budget_rows_are_kept_per_principal_model_unit_and_window(
    any_store: Callable[[], MemoryStateStore | LeasedStateStore],
) -> None:
    """The issue's case: one principal, two models, windows of an hour and a day, spent in turns.
    Each row keeps its own account (3 answers each, not 8: a window's turn no longer resets the
    other's row), a restart keeps them, and the global row of a model is yet another account."""
    hour = BudgetKey.for_model("key:p", "a", "epsilon", 3600)
    day = BudgetKey.for_model("key:p", "b", "epsilon", 86_400)
    others = [
        BudgetKey.for_model("key:q", "a", "epsilon", 3600),  # another principal
        BudgetKey.for_model("key:p", "a", "rho", 3600),  # another unit (private prediction)
        BudgetKey.for_model("key:p", "a", "epsilon", 7200),  # another window length
        BudgetKey.for_model(EVERYONE, "a", "epsilon", 3600),  # everyone together
    ]
    assert len({k.render() for k in [hour, day, *others]}) == 6
    assert hour == BudgetKey("key:p", "a/epsilon", 3600.0) and hour.render() == "key:p|a/epsilon|3600.0"

    async def run() -> tuple[list[bool], list[bool], list[bool], list[bool]]:
        store = any_store()
        a, b = [], []
        for i in range(8):
            now = 1_000_000.0 + i
            a.append((await store.spend_budget(hour, cost=1.0, limit=3.0, now=now)).allowed)
            b.append((await store.spend_budget(day, cost=1.0, limit=3.0, now=now)).allowed)
        fresh = [(await store.spend_budget(k, cost=3.0, limit=3.0, now=1_000_010.0)).allowed for k in others]
        await store.aclose()
        again = any_store()  # a restart (memory: the same store): nothing renews
        after = [
            (await again.spend_budget(k, cost=1.0, limit=3.0, now=1_000_020.0)).allowed for k in [hour, day]
        ]
        await again.aclose()
        return a, b, fresh, after

    a, b, fresh, after = asyncio.run(run())
    assert a == [True] * 3 + [False] * 5 and b == [True] * 3 + [False] * 5
    assert fresh == [True] * 4 and after == [False, False]
