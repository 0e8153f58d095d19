"""Query auditing's per-principal histories in the shared state backend, so that a thief who
spreads its queries over workers or replicas is seen as one stream.

The extraction monitor (bastion.extraction) keeps, per principal and model version, the last
rows it was asked about and its signal counts. In one process those live in memory. With
`bastion serve --workers N` or several replicas behind a balancer, a plain L4 balancer spreads a
principal's connections over processes: each would see a fraction of the stream, the near-duplicate
test would compare a query only with the rows that happened to reach the same process, and a
thief would be flagged N times later (or never). So, with `state.backend` sqlite, redis or
postgres, each history is one record in the backend, updated by compare-and-swap:

- SQLite (one host) and PostgreSQL: one transaction that takes the write lock (`BEGIN
  IMMEDIATE`) or the row's lock (`SELECT ... FOR UPDATE`) before reading; writers queue.
- Redis: optimistic. The worker computes on the last version it saw (a small local cache: a
  principal served by one worker costs one round trip a request) and stores it with one Lua
  compare-and-swap on a random version token; a lost swap answers with the current version and
  the worker computes again from it.

Every row is thus counted exactly once, against every row committed before it, whichever process
took it: a stream spread round-robin over N processes is flagged after the same number of
queries as on one (tests/e2e/test_workers.py measures it). The history that raised a suspicion
is deleted in the same swap (the next rung of the ladder takes new evidence), so one suspicion
opens one incident, however many workers see the stream.

Why not route each principal to one process instead: a TCP balancer (HAProxy in L4 mode, a
Kubernetes Service, SO_REUSEPORT between workers) sees connections, not principals, and a
thief chooses its connections. Sharding by principal would need an L7 balancer that reads the
credential and a rebalancing story when a replica dies; the shared record needs neither.

The cost: one read-modify-write per admitted request on a model with query auditing (Redis: one
round trip, two when the principal's previous request went to another process); the record is about
(columns + 1) x 128 x 4 bytes (16 KB for 30 columns). Measured in bench/RESULTS.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from bastion.errors import StateUnavailable
from bastion.files import enable_wal
from bastion.sqlite_wait import is_busy, retry_busy
from bastion.state.base import unavailable
from bastion.statedir import make_private_sqlite

if TYPE_CHECKING:
    import numpy as np

    from bastion.extraction import ExtractionMonitor, Suspicion, _History
    from bastion.llm.intent import Escalation, ExtractionTracker, IntentVerdict
    from bastion.llm.leakage import Revealed

Entry = tuple[bytes, bytes]  # the version's token, the history's bytes
Step = Callable[
    [bytes | None], bytes | None
]  # the stored history (None: none) -> the one to store (None: delete)
TTL = 86_400.0  # a history untouched this long is dropped (the in-process monitor forgets sooner)
_CACHE = 1024  # Redis: histories this process remembers the last version of (about 16 KB each)
_ATTEMPTS = 64  # Redis: swaps lost to other writers before the request fails closed


class HistoryStore(Protocol):
    """Where the histories live: one record per key, read, computed on and written as one step that
    no other writer interleaves with."""

    async def update(self, key: str, step: Step) -> None:
        """Apply `step` to the record under `key` (None when there is none) and store what it returns
        (None: delete). `step` may run more than once (Redis: after a lost swap); only the run whose
        result is stored counts. Raises StateUnavailable."""
        ...

    async def aclose(self) -> None: ...


class SQLiteHistoryStore:
    """The histories in a SQLite file of the state directory, shared by every worker on one host.
    An update is one `BEGIN IMMEDIATE` transaction: the write lock is taken before the read. It runs
    on the event loop without SQLite's busy wait: a lock another process holds is retried between
    `asyncio.sleep`s (`bastion.sqlite_wait`), for at most LOCK_WAIT_SECONDS, then StateUnavailable."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        make_private_sqlite(path)
        self._clock = clock
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=0.0)
        enable_wal(self._conn)
        self._conn.execute(
            "PRAGMA synchronous=NORMAL"
        )  # evidence, not records: a crash loses nothing committed
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS histories (key TEXT PRIMARY KEY, blob BLOB NOT NULL, expires REAL NOT NULL)"
        )
        self._writes = 0

    async def update(self, key: str, step: Step) -> None:
        try:
            try:
                self._update(key, step)
            except sqlite3.OperationalError as e:
                if not is_busy(e):
                    raise
                # Another process holds the write lock: wait for it between asyncio.sleeps.
                await retry_busy(lambda: self._update(key, step))
        except sqlite3.Error as e:
            raise unavailable(e) from None

    def _update(self, key: str, step: Step) -> None:
        conn, now = self._conn, self._clock()
        conn.execute("BEGIN IMMEDIATE")  # the write lock first: no other process between read and write
        try:
            row = conn.execute("SELECT blob, expires FROM histories WHERE key = ?", (key,)).fetchone()
            stored = None if row is None or row[1] < now else bytes(row[0])
            blob = step(stored)
            if blob is stored:  # unchanged (a read, or clean traffic): nothing to write
                conn.execute("COMMIT")
                return
            if blob is None:
                conn.execute("DELETE FROM histories WHERE key = ?", (key,))
            else:
                conn.execute("INSERT OR REPLACE INTO histories VALUES (?, ?, ?)", (key, blob, now + TTL))
            self._writes += 1
            if self._writes % 4096 == 0:
                conn.execute("DELETE FROM histories WHERE expires < ?", (now,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    async def aclose(self) -> None:
        self._conn.close()


# KEYS[1]: the record. ARGV: expected token ("" = none), new token, new blob ("" = delete), ttl in ms.
_SWAP = """
local current = redis.call('HGET', KEYS[1], 't')
if (current or '') ~= ARGV[1] then
  if not current then return {0, '', ''} end
  return {0, current, redis.call('HGET', KEYS[1], 'b')}
end
if ARGV[3] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('HSET', KEYS[1], 't', ARGV[2], 'b', ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
return {1}
"""


class RedisHistoryStore:
    """The histories in Redis, one hash per principal and model version. An update is optimistic:
    computed on the version this process saw last (a local cache), stored by one Lua
    compare-and-swap on a random version token; a lost swap answers with the current version, and
    the step runs again on it. A principal served by one process: one round trip per request."""

    def __init__(self, url: str, *, prefix: str = "bastion:", timeout: float = 1.0) -> None:
        import redis.asyncio as aioredis

        self._prefix = prefix + "history:"
        self._client = aioredis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self._swap = self._client.register_script(_SWAP)
        self._seen: OrderedDict[str, Entry] = OrderedDict()  # key -> the last version this process saw
        # One update per history at a time in this process: concurrent requests of one principal
        # would otherwise all compute on the same version and all but one lose their swap (measured
        # by bench/scaling.py: 503s and 3.5x slower with 32 connections on one key). Only other
        # processes' writes can make a swap fail.
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    async def update(self, key: str, step: Step) -> None:
        lock, users = self._locks.get(key) or (asyncio.Lock(), 0)
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                await self._update(key, step)
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    async def _update(self, key: str, step: Step) -> None:
        from redis.exceptions import RedisError

        entry = self._seen.pop(key, None)
        for attempt in range(_ATTEMPTS):
            blob = step(entry[1] if entry is not None and entry[1] else None)
            token = os.urandom(8)
            expected = entry[0] if entry is not None else b""
            try:
                reply: list[Any] = await self._swap(
                    keys=[self._prefix + key], args=[expected, token, blob or b"", int(TTL * 1000)]
                )
            except RedisError as e:
                raise unavailable(e) from None
            if int(reply[0]) == 1:
                if blob is not None:
                    self._seen[key] = (token, blob)
                    if len(self._seen) > _CACHE:
                        self._seen.popitem(last=False)
                return
            entry = (bytes(reply[1]), bytes(reply[2]))
            if attempt >= 2:  # contended: let the other writer finish before trying again
                await asyncio.sleep(0.0005 * attempt)
        raise StateUnavailable("query auditing state contended; nothing was answered")

    async def aclose(self) -> None:
        await self._client.aclose()


class PostgresHistoryStore:
    """The histories in a PostgreSQL table, one row per principal and model version. An update is
    one transaction that locks the row (`FOR UPDATE`) before reading it: writers queue, none starves."""

    def __init__(
        self, dsn: str, *, table: str, timeout: float = 2.0, clock: Callable[[], float] = time.time
    ) -> None:
        self._dsn, self._table, self._timeout, self._clock = dsn, table + "_history", timeout, clock
        self._conn: Any = None
        self._lock = asyncio.Lock()  # one connection, one transaction at a time

    async def _connection(self) -> Any:
        import psycopg

        if self._conn is None or self._conn.closed:
            conn = await psycopg.AsyncConnection.connect(self._dsn, connect_timeout=int(self._timeout))
            # Evidence, not records: a commit need not wait for the WAL's flush (measured: 4 ms a
            # request with it, bench/query_history.py). A database crash may lose the last few
            # updates of a history; it never mixes two.
            await conn.execute("SET synchronous_commit TO OFF")
            await conn.commit()  # (the SET opened a transaction: each update below must be its own)
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self._table,))
                await conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {self._table} (key text PRIMARY KEY, blob bytea, "
                    "expires double precision NOT NULL)"
                )
            self._conn = conn
        return self._conn

    async def update(self, key: str, step: Step) -> None:
        """Raises StateUnavailable on a failure, or past `DEADLINE` (bastion.state.postgres): the
        call is then left behind with its connection and lock, and the next gets new ones."""
        import psycopg

        from bastion.state.postgres import DEADLINE, within_deadline

        now = self._clock()
        lock = self._lock

        async def attempt() -> None:
            async with lock:
                conn = await self._connection()
                async with conn.transaction():
                    select = f"SELECT blob, expires FROM {self._table} WHERE key = %s FOR UPDATE"
                    row = await (await conn.execute(select, (key,))).fetchone()
                    if row is None:  # a row (empty) first, so that there is always one to lock
                        await conn.execute(
                            f"INSERT INTO {self._table} VALUES (%s, NULL, 0) ON CONFLICT DO NOTHING", (key,)
                        )
                        row = await (await conn.execute(select, (key,))).fetchone()
                    stored = None if row is None or row[0] is None or row[1] < now else bytes(row[0])
                    blob = step(stored)
                    if blob is stored and stored is not None:
                        return  # unchanged (a read): nothing to write
                    if blob is None:
                        await conn.execute(f"DELETE FROM {self._table} WHERE key = %s", (key,))
                    else:
                        await conn.execute(
                            f"UPDATE {self._table} SET blob = %s, expires = %s WHERE key = %s",
                            (blob, now + TTL, key),
                        )

        try:
            await within_deadline(attempt, DEADLINE)
        except TimeoutError as e:
            self._lock, self._conn = asyncio.Lock(), None
            raise unavailable(e) from None
        except psycopg.Error as e:
            raise unavailable(e) from None

    async def aclose(self) -> None:
        if self._conn is not None:
            await self._conn.close()


class SharedHistories:
    """The extraction monitors' histories kept in a `HistoryStore`, per (model, version, principal)
    key: `observe` and `refused` are the monitor's, on the stored history."""

    def __init__(self, store: HistoryStore) -> None:
        self.store = store

    async def observe(
        self, monitor: ExtractionMonitor, key: str, z: np.ndarray, squared: list[float]
    ) -> Suspicion | None:
        return await self._update(monitor, key, lambda history: monitor.observe_history(history, z, squared))

    async def refused(self, monitor: ExtractionMonitor, key: str) -> Suspicion | None:
        return await self._update(monitor, key, monitor.refused_history)

    async def _update(
        self, monitor: ExtractionMonitor, key: str, count: Callable[[_History], Suspicion | None]
    ) -> Suspicion | None:
        verdict: list[Suspicion | None] = [None]

        def step(stored: bytes | None) -> bytes | None:
            history = monitor.new_history()
            if stored is not None:
                try:
                    history = monitor.unpack(stored)
                except ValueError:  # a version of the model with other columns under the same name
                    history = monitor.new_history()
            verdict[0] = count(history)
            # The history that raised a suspicion goes with it: one incident per suspicion.
            return None if verdict[0] is not None else monitor.pack(history)

        await self.store.update(key, step)
        return verdict[0]

    async def aclose(self) -> None:
        await self.store.aclose()


class SharedTracker:
    """The language-model `ExtractionTracker`'s evidence kept in a `HistoryStore`, per (model,
    principal): one record updated per counted request, the record that escalated deleted in the
    same step (one incident per escalation). Clean traffic reads the store and writes nothing
    (SQLite, PostgreSQL) or one no-op swap (Redis)."""

    def __init__(self, tracker: ExtractionTracker, store: HistoryStore) -> None:
        self.tracker = tracker
        self.store = store

    async def observe(
        self, principal: str, model: str, verdict: IntentVerdict, *, guard_hit: bool, now: float
    ) -> Escalation | None:
        return await self._count(principal, model, verdict, intake=True, guard_hit=guard_hit, now=now)

    async def observe_guard_hit(
        self, principal: str, model: str, verdict: IntentVerdict, *, now: float
    ) -> Escalation | None:
        return await self._count(principal, model, verdict, intake=False, guard_hit=True, now=now)

    async def _count(
        self, principal: str, model: str, verdict: IntentVerdict, *, intake: bool, guard_hit: bool, now: float
    ) -> Escalation | None:
        from bastion.llm.intent import pack_evidence, unpack_evidence

        tracker = self.tracker
        verdicts: list[Escalation | None] = [None]

        def step(stored: bytes | None) -> bytes | None:
            verdicts[0] = None
            evidence = None
            if stored is not None:
                try:
                    evidence = unpack_evidence(stored)
                except ValueError:
                    evidence = None
            if evidence is None:
                if not tracker.worth_keeping(verdict, guard_hit=guard_hit):
                    return None  # nothing to count, nothing stored
                evidence = tracker.new_evidence()
            verdicts[0] = tracker.count_on(evidence, verdict, intake=intake, guard_hit=guard_hit, now=now)
            return None if verdicts[0] is not None else pack_evidence(evidence)

        await self.store.update(f"prompt|{model}|{principal}", step)
        return verdicts[0]


class SharedLedgers:
    """The leakage guard's per-principal `Revealed` ledgers kept in a `HistoryStore`: read when an
    answer starts, and what the answer revealed merged in (bitwise or) when it ends. Two answers of
    one principal checked at once on two processes are each checked against the ledger as it stood
    when they started, as two concurrent answers in one process are."""

    def __init__(self, store: HistoryStore) -> None:
        self.store = store

    async def load(self, principal: str) -> Revealed:
        from bastion.llm.leakage import Revealed

        ledger = Revealed()
        seen: list[bytes | None] = [None]

        def step(stored: bytes | None) -> bytes | None:
            seen[0] = stored
            return stored  # unchanged

        await self.store.update(f"revealed|{principal}", step)
        for key, bits in _ledger_items(seen[0]):
            ledger.add(key, bits)
        return ledger

    async def save(self, principal: str, ledger: Revealed) -> None:
        """Merge the ledger's positions into the stored ones (positions only grow)."""
        added = ledger.items()
        if not added:
            return

        def step(stored: bytes | None) -> bytes | None:
            merged = dict(_ledger_items(stored))
            for key, bits in added:
                merged[key] = merged.get(key, 0) | bits
            kept = list(merged.items())[-_LEDGER_KEYS:]
            return json.dumps([[digest, index, bits] for (digest, index), bits in kept]).encode()

        await self.store.update(f"revealed|{principal}", step)


_LEDGER_KEYS = 256  # secrets per principal, as `Revealed`'s own bound


def _ledger_items(stored: bytes | None) -> list[tuple[tuple[str, int], int]]:
    if not stored:
        return []
    try:
        return [((str(d), int(i)), int(b)) for d, i, b in json.loads(stored)]
    except (ValueError, TypeError):
        return []


def open_histories(
    backend: str, *, path: Path, redis_url: str, redis_prefix: str, postgres_dsn: str, postgres_table: str
) -> SharedHistories | None:
    """The store for `state.backend`: None for "memory" (the monitors keep their histories in process)."""
    if backend == "sqlite":
        return SharedHistories(SQLiteHistoryStore(path))
    if backend == "redis":
        return SharedHistories(RedisHistoryStore(redis_url, prefix=redis_prefix))
    if backend == "postgres":
        return SharedHistories(PostgresHistoryStore(postgres_dsn, table=postgres_table))
    return None
