"""The cost of keeping keys in the shared backend, per request, and how fast a revocation spreads.

    .venv/bin/python bench/shared_records.py [--calls 20000] [--revocations 20]

For the SQLite key store and the Redis and PostgreSQL ones (`bastion.records`; the local Redis on
127.0.0.1:6379 database 14 and PostgreSQL on 127.0.0.1:5432, scratch namespaces removed after):

- one counter read (`Records.version`), the round trip a shared store makes at most every 0.25 s;
- `authenticate` of a known key as served (the counter read at most every 0.25 s), and with the
  counter read on every call (what a per-request check would cost);
- the delay from a revocation on one store ("replica A") until another ("replica B", polling
  `authenticate` every millisecond) refuses the key: median and worst of `--revocations` runs.

Wall and CPU microseconds per call (CPU: this process only; the server's side is not counted).
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import bastion.records
from bastion.errors import AuthenticationFailed
from bastion.keys import KeyRecords, KeyStore, SharedKeyStore
from bastion.records import Records

REDIS_URL = "redis://127.0.0.1:6379/14"
POSTGRES_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


def _per_call(run: Callable[[], object], calls: int) -> tuple[float, float]:
    """(wall µs, CPU µs) per call."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        run()
    return (time.perf_counter() - wall) / calls * 1e6, (time.process_time() - cpu) / calls * 1e6


def _propagation(a: KeyRecords, b: KeyRecords, runs: int) -> list[float]:
    delays = []
    for _ in range(runs):
        new = a.create(name="bench", roles=["analyst"], now=time.time())
        b.authenticate(new.secret, now=time.time())  # cached on B
        time.sleep(0.3 * secrets.randbelow(1000) / 1000)  # anywhere in B's check interval
        a.revoke(new.record.key_id, now=time.time())
        start = time.monotonic()
        while True:
            try:
                b.authenticate(new.secret, now=time.time())
            except AuthenticationFailed:
                break
            time.sleep(0.001)
        delays.append(time.monotonic() - start)
    return delays


def _bench(
    name: str, open_store: Callable[[], KeyRecords], records: Records | None, args: argparse.Namespace
) -> None:
    a, b = open_store(), open_store()
    key = a.create(name="bench", roles=["analyst"], now=time.time()).secret
    now = time.time()
    version = "-"
    if records is not None:
        wall, cpu = _per_call(lambda: records.version("api_keys"), args.calls // 10)
        version = f"{wall:.0f} / {cpu:.0f}"
    served = _per_call(lambda: b.authenticate(key, now=now), args.calls)
    bastion.records.CHECK_EVERY = 0.0  # read the counter on every call
    every = _per_call(lambda: b.authenticate(key, now=now), args.calls // 10)
    bastion.records.CHECK_EVERY = 0.25
    delays = _propagation(a, b, args.revocations)
    print(
        f"| {name} | {version} | {served[0]:.1f} / {served[1]:.1f} | {every[0]:.0f} / {every[1]:.0f} "
        f"| {statistics.median(delays) * 1000:.0f} | {max(delays) * 1000:.0f} |"
    )
    a.close()
    b.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--revocations", type=int, default=20)
    args = parser.parse_args()
    print(
        "| key store | counter read µs (wall / CPU) | authenticate as served µs | counter read every call µs "
        "| revocation seen after, median ms | worst ms |"
    )
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        _bench("SQLite (data_version per call)", lambda: KeyStore(Path(tmp) / "keys.db"), None, args)

    import redis

    from bastion.records.redis import RedisRecords

    prefix = f"bench-{secrets.token_hex(4)}:"
    try:
        shared = RedisRecords(REDIS_URL, prefix=prefix)
        _bench("Redis", lambda: SharedKeyStore(RedisRecords(REDIS_URL, prefix=prefix)), shared, args)
        shared.close()
    finally:
        client = redis.Redis.from_url(REDIS_URL)
        found = list(client.scan_iter(match=f"{prefix}*"))
        if found:
            client.delete(*found)
        client.close()

    import psycopg

    from bastion.records.postgres import PostgresRecords

    table = f"bench_{secrets.token_hex(4)}_records"
    try:
        pg = PostgresRecords(POSTGRES_DSN, table=table)
        _bench("PostgreSQL", lambda: SharedKeyStore(PostgresRecords(POSTGRES_DSN, table=table)), pg, args)
        pg.close()
    finally:
        with psycopg.connect(POSTGRES_DSN) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {table}, {table}_counters")


if __name__ == "__main__":
    main()
