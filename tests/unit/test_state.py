"""Rate limits and quotas: exact under concurrency, durable in SQLite."""

from __future__ import annotations

import asyncio
import multiprocessing
from pathlib import Path

import pytest

from bastion.state import DAY, LimitSpec, MemoryStateStore, SQLiteStateStore, StateStore

SPEC = LimitSpec(rate=1.0, burst=3, daily_quota=5)


def _stores(tmp_path: Path) -> list[StateStore]:
    return [MemoryStateStore(), SQLiteStateStore(tmp_path / "limits.db")]


@pytest.mark.parametrize("index", [0, 1], ids=["memory", "sqlite"])
def test_bucket_refills_and_quota_runs_out(tmp_path: Path, index: int) -> None:
    store = _stores(tmp_path)[index]

    async def run() -> None:
        t = 1000.0
        got = [(await store.acquire("p", SPEC, now=t)).allowed for _ in range(4)]
        assert got == [True, True, True, False]
        refused = await store.acquire("p", SPEC, now=t)
        assert refused.reason == "rate_limited" and 0 < refused.retry_after <= 1.0
        assert (await store.acquire("p", SPEC, now=t + 1.0)).allowed  # one token back after 1 s
        assert (await store.acquire("p", SPEC, now=t + 2.0)).allowed
        out = await store.acquire("p", SPEC, now=t + 10.0)  # bucket full again, quota (5) spent
        assert not out.allowed and out.reason == "quota_exhausted"
        assert out.retry_after == pytest.approx(DAY - t - 10.0)
        assert (await store.acquire("p", SPEC, now=DAY + 1.0)).allowed  # a new UTC day
        assert (await store.acquire("other", SPEC, now=t)).allowed  # per principal

    asyncio.run(run())
    store.close()


def test_sqlite_quota_survives_a_restart(tmp_path: Path) -> None:
    async def spend(n: int) -> list[bool]:
        store = SQLiteStateStore(tmp_path / "limits.db")
        out = [(await store.acquire("p", LimitSpec(100, 100, 5), now=50.0 + i)).allowed for i in range(n)]
        store.close()
        return out

    assert asyncio.run(spend(3)) == [True, True, True]
    assert asyncio.run(spend(3)) == [True, True, False]


def _worker(path: str, n: int, queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    async def run() -> int:
        store = SQLiteStateStore(Path(path))
        ok = 0
        for _ in range(n):
            ok += (await store.acquire("shared", LimitSpec(1e6, 10**6, 150), now=500.0)).allowed
        store.close()
        return ok

    queue.put(asyncio.run(run()))


@pytest.mark.slow
def test_sqlite_quota_is_exact_across_processes(tmp_path: Path) -> None:
    """Four worker processes race for 150 units: exactly 150 are granted, never more."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(str(tmp_path / "limits.db"), 100, queue)) for _ in range(4)]
    for p in procs:
        p.start()
    granted = sum(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert granted == 150


def test_sqlite_crash_forfeits_at_most_one_lease_and_never_over_grants(tmp_path: Path) -> None:
    spec = LimitSpec(rate=1000, burst=1000, daily_quota=1000)

    async def spend(n: int, *, clean: bool) -> int:
        store = SQLiteStateStore(tmp_path / "limits.db")
        ok = sum([(await store.acquire("p", spec, now=10.0)).allowed for _ in range(n)])
        if clean:
            store.close()
        return ok

    assert asyncio.run(spend(10, clean=False)) == 10  # "crash": its unspent lease is not returned
    total = 10 + asyncio.run(spend(2000, clean=True))
    assert 1000 - 64 <= total <= 1000  # never more than the quota; at most one lease block lost
