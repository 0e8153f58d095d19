"""The cost per request of query auditing's shared histories (bastion.query_history).

In process, on the breast-cancer data (30 columns: a 16 KB history): the time of one
`observe` of one new row, with the history kept in memory (one process, as before) and in each
shared store, for a principal whose requests all reach one process, and for one whose requests
alternate between two processes (each write follows another process's). Redis and PostgreSQL on
this machine's loopback.

    .venv/bin/python bench/query_history.py [--requests 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from sklearn.datasets import load_breast_cancer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bastion.extraction import ExtractionMonitor  # noqa: E402
from bastion.ood import DistributionScreen  # noqa: E402
from bastion.query_history import (  # noqa: E402
    HistoryStore,
    PostgresHistoryStore,
    RedisHistoryStore,
    SharedHistories,
    SQLiteHistoryStore,
)

REDIS_URL = "redis://127.0.0.1:6379/14"
POSTGRES_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


def rows(count: int) -> tuple[np.ndarray, np.ndarray]:
    x = load_breast_cancer().data
    rng = np.random.default_rng(1)
    reference = x[::2]
    genuine = x[1::2][rng.integers(0, len(x) // 2, count)] * (
        1 + 0.05 * rng.standard_normal((count, x.shape[1]))
    )
    return reference, genuine


async def time_shared(
    monitor: ExtractionMonitor, stores: list[HistoryStore], queries: list[tuple[np.ndarray, list[float]]]
) -> float:
    """Median microseconds per observe, the requests taking turns among the stores (processes)."""
    processes = [SharedHistories(store) for store in stores]
    times = []
    for i, (z, squared) in enumerate(queries):
        process = processes[i % len(processes)]
        started = time.perf_counter()
        await process.observe(monitor, f"bench|1|key:{os.getpid()}", z, squared)
        times.append(time.perf_counter() - started)
    for store in stores:
        await store.aclose()
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    reference, genuine = rows(args.requests)
    monitor = ExtractionMonitor(DistributionScreen(reference), reference)
    queries = [monitor.screen.measure({"x": row[None]}, ["x"]) for row in genuine]

    times = []
    for z, squared in queries:
        started = time.perf_counter()
        monitor.observe("key:bench", z, squared)
        times.append(time.perf_counter() - started)
    results: dict[str, tuple[float, float | None]] = {
        "memory (one process)": (statistics.median(times) * 1e6, None)
    }

    work = Path(tempfile.mkdtemp(prefix="bastion-bench-history-"))
    table = f"bastion_bench_history_{os.getpid()}"
    prefix = f"bastion-bench-history-{os.getpid()}:"
    makers: dict[str, Callable[[int], HistoryStore]] = {
        "sqlite": lambda n: SQLiteHistoryStore(work / "histories.db"),
        "redis": lambda n: RedisHistoryStore(REDIS_URL, prefix=prefix),
        "postgres": lambda n: PostgresHistoryStore(POSTGRES_DSN, table=table),
    }
    for name, make in makers.items():
        one = asyncio.run(time_shared(monitor, [make(0)], queries))
        two = asyncio.run(time_shared(monitor, [make(0), make(1)], queries))
        results[name] = (one, two)
    _drop(prefix, table)

    print(f"{'history kept in':<22}{'one process us':>16}{'two processes us':>18}")
    for name, (alone, alternating) in results.items():
        shown = "" if alternating is None else f"{alternating:.0f}"
        print(f"{name:<22}{alone:>16.0f}{shown:>18}")
    print(
        f"\n(median of {args.requests} observes of one new row, breast-cancer's 30 columns; "
        "'two processes': the requests alternate between two store clients)"
    )


def _drop(prefix: str, table: str) -> None:
    import psycopg
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    found = list(client.scan_iter(match=f"{prefix}*"))
    if found:
        client.delete(*found)
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {table}_history")


if __name__ == "__main__":
    main()
