"""`Records` in PostgreSQL: one table of records and one of counters.

`<table>` holds (collection, key, value); `<table>_counters` holds each collection's change
counter and sequence. A swap is one transaction: a conditional INSERT, UPDATE or DELETE, then the
counter, so a reader never sees a change without its counter having moved. The tables are
created on first connection (under an advisory lock: replicas start together).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from typing import TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from bastion.errors import ConfigError
from bastion.records import Breaker

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,53}$")  # room for "_counters" within 63 characters
T = TypeVar("T")


class PostgresRecords:
    """One connection per process, behind a lock (autocommit; a swap is an explicit transaction)."""

    def __init__(self, dsn: str, *, table: str = "bastion_records", timeout: float = 2.0) -> None:
        if not _IDENTIFIER.match(table):
            raise ConfigError(
                f"state.postgres_table: too long for the shared records' tables named after it ({table!r} "
                "and its _counters: 63 characters at most, so 46 for postgres_table)"
            )
        self._dsn, self._table, self._timeout = dsn, table, timeout
        self._counters = f"{table}_counters"
        self._conn: psycopg.Connection | None = None
        self._lock = threading.Lock()
        self._breaker = Breaker()

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            # Bounded waits, unless the DSN sets its own: connecting, and data the server does not
            # acknowledge (a partition mid-query would otherwise hold the caller for minutes).
            given = conninfo_to_dict(self._dsn)
            bounds = {"connect_timeout": max(2, int(self._timeout)), "tcp_user_timeout": 1000}
            extra = {k: v for k, v in bounds.items() if k not in given}
            conn = psycopg.connect(make_conninfo(self._dsn, **extra), autocommit=True)
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self._table,))
                conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {self._table} (collection text NOT NULL, key text NOT NULL, "
                    "value text NOT NULL, PRIMARY KEY (collection, key))"
                )
                conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {self._counters} (collection text PRIMARY KEY, "
                    "version bigint NOT NULL DEFAULT 0, seq bigint NOT NULL DEFAULT 0)"
                )
            self._conn = conn
        return self._conn

    def _run(self, work: Callable[[psycopg.Connection], T]) -> T:
        self._breaker.check()
        with self._lock:
            try:
                return work(self._connection())
            except psycopg.Error as e:
                raise self._breaker.failed(e) from None

    def get(self, collection: str, key: str) -> str | None:
        def work(conn: psycopg.Connection) -> str | None:
            row = conn.execute(
                f"SELECT value FROM {self._table} WHERE collection = %s AND key = %s", (collection, key)
            ).fetchone()
            return None if row is None else str(row[0])

        return self._run(work)

    def items(self, collection: str) -> dict[str, str]:
        def work(conn: psycopg.Connection) -> dict[str, str]:
            rows = conn.execute(
                f"SELECT key, value FROM {self._table} WHERE collection = %s", (collection,)
            ).fetchall()
            return {str(k): str(v) for k, v in rows}

        return self._run(work)

    def swap(self, collection: str, key: str, old: str | None, new: str | None) -> bool:
        if old is None and new is None:
            return False

        def work(conn: psycopg.Connection) -> bool:
            with conn.transaction():
                if old is None:
                    cur = conn.execute(
                        f"INSERT INTO {self._table} VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                        (collection, key, new),
                    )
                elif new is None:
                    cur = conn.execute(
                        f"DELETE FROM {self._table} WHERE collection = %s AND key = %s AND value = %s",
                        (collection, key, old),
                    )
                else:
                    cur = conn.execute(
                        f"UPDATE {self._table} SET value = %s WHERE collection = %s AND key = %s AND value = %s",
                        (new, collection, key, old),
                    )
                if cur.rowcount != 1:
                    return False
                conn.execute(
                    f"INSERT INTO {self._counters} (collection, version) VALUES (%s, 1) "
                    f"ON CONFLICT (collection) DO UPDATE SET version = {self._counters}.version + 1",
                    (collection,),
                )
                return True

        return self._run(work)

    def version(self, collection: str) -> int:
        def work(conn: psycopg.Connection) -> int:
            row = conn.execute(
                f"SELECT version FROM {self._counters} WHERE collection = %s", (collection,)
            ).fetchone()
            return 0 if row is None else int(row[0])

        return self._run(work)

    def next_id(self, collection: str) -> int:
        def work(conn: psycopg.Connection) -> int:
            row = conn.execute(
                f"INSERT INTO {self._counters} (collection, seq) VALUES (%s, 1) "
                f"ON CONFLICT (collection) DO UPDATE SET seq = {self._counters}.seq + 1 RETURNING seq",
                (collection,),
            ).fetchone()
            assert row is not None
            return int(row[0])

        return self._run(work)

    def reachable(self) -> bool:
        try:
            self._run(lambda conn: conn.execute("SELECT 1"))
        except Exception:
            return False
        return True

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
