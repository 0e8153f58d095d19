"""Query auditing's histories in the shared backends (SQLite, Redis, PostgreSQL): a thief whose
queries are spread round-robin over several processes is flagged after exactly as many queries
as against one process, genuine traffic spread alike raises nothing, writers racing on one
principal lose no query, and the history that raised a suspicion is gone for every process."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer

from bastion.extraction import ExtractionMonitor, Suspicion
from bastion.ood import DistributionScreen
from bastion.query_history import (
    HistoryStore,
    PostgresHistoryStore,
    RedisHistoryStore,
    SharedHistories,
    SQLiteHistoryStore,
)
from tests.helpers import (
    POSTGRES_DSN,
    REDIS_URL,
    drop_postgres_table,
    drop_redis_keys,
    postgres_table,
    redis_prefix,
)

BACKENDS = ["sqlite", "redis", "postgres"]


def _data() -> tuple[np.ndarray, np.ndarray]:
    x = load_breast_cancer().data
    order = np.random.default_rng(7).permutation(len(x))
    return x[order[: len(x) // 2]], x[order[len(x) // 2 :]]


REFERENCE, HELD_OUT = _data()
MONITOR = ExtractionMonitor(DistributionScreen(REFERENCE), REFERENCE)


def _thief(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    seeds, spread = HELD_OUT[:5], REFERENCE.std(axis=0)
    return np.array(
        [seeds[i % 5] + 0.01 * spread * np.sign(rng.standard_normal(REFERENCE.shape[1])) for i in range(120)]
    )


class Stores:
    """A factory of stores on one backend: each call is another process's client."""

    def __init__(self, make: Callable[[], HistoryStore]) -> None:
        self._make = make
        self.made: list[HistoryStore] = []

    def __call__(self) -> HistoryStore:
        self.made.append(self._make())
        return self.made[-1]

    def run(self, scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
        async def go() -> None:
            try:
                await scenario()
            finally:
                for store in self.made:
                    await store.aclose()
                self.made.clear()

        asyncio.run(go())


@pytest.fixture(params=BACKENDS)
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stores]:
    if request.param == "redis":
        prefix = redis_prefix()

        def make() -> HistoryStore:
            return RedisHistoryStore(REDIS_URL, prefix=prefix)
    elif request.param == "postgres":
        table = postgres_table()

        def make() -> HistoryStore:
            return PostgresHistoryStore(POSTGRES_DSN, table=table)
    else:

        def make() -> HistoryStore:
            return SQLiteHistoryStore(tmp_path / "histories.db")

    yield Stores(make)
    if request.param == "redis":
        drop_redis_keys(prefix)
    elif request.param == "postgres":
        drop_postgres_table(table + "_history")


def _one_process(queries: np.ndarray) -> tuple[int, Suspicion] | None:
    monitor = ExtractionMonitor(DistributionScreen(REFERENCE), REFERENCE)
    for i, row in enumerate(queries):
        z, squared = monitor.screen.measure({"x": row[None]}, ["x"])
        found = monitor.observe("key:p", z, squared)
        if found is not None:
            return i + 1, found
    return None


async def _spread(
    processes: list[SharedHistories], queries: np.ndarray, key: str = "m|1|key:p"
) -> tuple[int, Suspicion] | None:
    for i, row in enumerate(queries):
        z, squared = MONITOR.screen.measure({"x": row[None]}, ["x"])
        found = await processes[i % len(processes)].observe(MONITOR, key, z, squared)
        if found is not None:
            return i + 1, found
    return None


def test_a_thief_spread_over_processes_is_flagged_as_soon_as_on_one(stores: Stores) -> None:
    alone = _one_process(_thief())
    assert alone is not None and alone[0] <= 40
    stores.run(lambda: _thief_spread(stores, alone))


async def _thief_spread(stores: Stores, alone: tuple[int, Suspicion]) -> None:
    for count in (2, 3):
        processes = [SharedHistories(stores()) for _ in range(count)]
        key = f"m|1|key:thief-{count}"
        spread = await _spread(processes, _thief(), key)
        assert spread == alone, (count, spread, alone)
        # The suspicion took the history with it, for every process: the next query starts afresh.
        z, squared = MONITOR.screen.measure({"x": HELD_OUT[50:51]}, ["x"])
        assert await processes[-1].observe(MONITOR, key, z, squared) is None
        assert MONITOR.unpack(await _read(stores(), key)).queries == 1


def test_in_process_monitors_alone_would_miss_it() -> None:
    """Why the histories are shared: two monitors each seeing every other query flag later or never."""
    alone = _one_process(_thief())
    assert alone is not None
    halves = [_one_process(_thief()[k::2]) for k in (0, 1)]
    assert all(h is None or 2 * h[0] > alone[0] for h in halves)


def test_genuine_traffic_spread_over_processes_raises_nothing(stores: Stores) -> None:
    async def scenario() -> None:
        processes = [SharedHistories(stores()) for _ in range(2)]
        assert await _spread(processes, HELD_OUT[:200]) is None

    stores.run(scenario)


def test_racing_writers_lose_no_query(stores: Stores) -> None:
    """Two processes updating one principal at once: every query is counted exactly once."""
    stores.run(lambda: _race(stores))


async def _race(stores: Stores) -> None:
    processes = [SharedHistories(stores()) for _ in range(2)]
    rows = HELD_OUT[:40]

    async def send(process: SharedHistories, part: np.ndarray) -> None:
        for row in part:
            z, squared = MONITOR.screen.measure({"x": row[None]}, ["x"])
            assert await process.observe(MONITOR, "m|1|key:race", z, squared) is None

    await asyncio.gather(send(processes[0], rows[0::2]), send(processes[1], rows[1::2]))
    assert MONITOR.unpack(await _read(stores(), "m|1|key:race")).queries == len(rows)


async def _read(store: HistoryStore, key: str) -> bytes:
    """The stored history, as a third process reads it (and stores it back unchanged)."""
    seen: list[bytes | None] = []

    def step(stored: bytes | None) -> bytes | None:
        seen.append(stored)
        return stored

    await store.update(key, step)
    assert seen[-1] is not None
    return seen[-1]


def test_a_history_survives_packing_and_refuses_another_shape() -> None:
    history = MONITOR.new_history()
    z, squared = MONITOR.screen.measure({"x": HELD_OUT[:3]}, ["x"])
    MONITOR.observe_history(history, z, squared)
    history.refused, history.flagged = 2, True
    again = MONITOR.unpack(MONITOR.pack(history))
    assert (again.queries, again.refused, again.flagged, again.next) == (3, 2, True, 3)
    assert again.near == history.near and again.far == history.far
    assert np.array_equal(again.recent, history.recent)
    with pytest.raises(ValueError, match="another shape"):
        MONITOR.unpack(MONITOR.pack(history)[:-4])
