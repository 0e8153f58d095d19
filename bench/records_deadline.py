"""What the client-side deadline costs a call to the shared backend: one counter read
(`Records.version`, the round trip a caching store makes at most every 0.25 s per store) made on the
caller's thread as before, against the same read through the `Guard` (handed to a worker thread and
waited for with a deadline), side by side in alternating rounds.

    .venv/bin/python bench/records_deadline.py [--calls 5000] [--rounds 4]

The local Redis (127.0.0.1:6379 database 14) and PostgreSQL (127.0.0.1:5432), scratch namespaces
removed after. Wall and CPU microseconds per call (CPU: every thread of this process).
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import time
from collections.abc import Callable

REDIS_URL = "redis://127.0.0.1:6379/14"
POSTGRES_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


def _per_call(run: Callable[[], object], calls: int) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        run()
    return (time.perf_counter() - wall) / calls * 1e6, (time.process_time() - cpu) / calls * 1e6


def _compare(name: str, direct: Callable[[], object], guarded: Callable[[], object], args: argparse.Namespace) -> None:
    for run in (direct, guarded):
        _per_call(run, args.calls // 10)  # warm-up
    sides: dict[str, list[tuple[float, float]]] = {"direct": [], "guarded": []}
    for _ in range(args.rounds):
        sides["direct"].append(_per_call(direct, args.calls))
        sides["guarded"].append(_per_call(guarded, args.calls))
    d = [statistics.median(x[i] for x in sides["direct"]) for i in (0, 1)]
    g = [statistics.median(x[i] for x in sides["guarded"]) for i in (0, 1)]
    print(
        f"| {name} | {d[0]:.0f} / {d[1]:.0f} | {g[0]:.0f} / {g[1]:.0f} | +{g[0] - d[0]:.0f} / +{g[1] - d[1]:.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    print("| backend | on the caller's thread µs (wall / CPU) | through the Guard µs | difference |")
    print("|---|---|---|---|")

    import redis

    from bastion.records.redis import RedisRecords

    prefix = f"bench-{secrets.token_hex(4)}:"
    shared = RedisRecords(REDIS_URL, prefix=prefix)
    client = redis.Redis.from_url(REDIS_URL)
    try:
        shared.swap("c", "k", None, "1")
        key = f"{prefix}records-version:c"
        _compare("Redis", lambda: client.get(key), lambda: shared.version("c"), args)
    finally:
        found = list(client.scan_iter(match=f"{prefix}*"))
        if found:
            client.delete(*found)
        client.close()
        shared.close()

    import psycopg

    from bastion.records.postgres import PostgresRecords

    table = f"bench_{secrets.token_hex(4)}_records"
    pg = PostgresRecords(POSTGRES_DSN, table=table)
    try:
        pg.swap("c", "k", None, "1")
        conn = pg._connect()  # the same connection settings, used on this thread

        def direct() -> object:
            return conn.execute(f"SELECT version FROM {table}_counters WHERE collection = %s", ("c",)).fetchone()

        _compare("PostgreSQL", direct, lambda: pg.version("c"), args)
        conn.close()
    finally:
        pg.close()
        with psycopg.connect(POSTGRES_DSN) as c:
            c.execute(f"DROP TABLE IF EXISTS {table}, {table}_counters")


if __name__ == "__main__":
    main()
