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
from bastion.records import DEADLINE, Abandoned, Guard, target

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,53}$")  # room for "_counters" within 63 characters
T = TypeVar("T")
_IDLE = 4  # pooled connections kept (one per worker thread of the Guard)
# Server-side bounds, a little past the caller's deadline: they end what the caller abandoned.
_STATEMENT_MS = int(DEADLINE * 1000) * 3
_LOCK_MS = int(DEADLINE * 1000) * 2


class PostgresRecords:
    """Connections pooled per process (autocommit; a swap is an explicit transaction); every call runs
    through a `Guard` (a worker thread, a `DEADLINE` for the caller). Each connection carries
    `statement_timeout` and `lock_timeout` (unless the DSN's `options` set them), so a call abandoned
    behind another session's table lock is ended by the server too, and its connection closed."""

    def __init__(
        self, dsn: str, *, table: str = "bastion_records", timeout: float = 2.0, source: str = ""
    ) -> None:
        if not _IDENTIFIER.match(table):
            raise ConfigError(
                f"state.postgres_table: too long for the shared records' tables named after it ({table!r} "
                "and its _counters: 63 characters at most, so 46 for postgres_table)"
            )
        self._dsn, self._table, self._timeout = dsn, table, timeout
        self._counters = f"{table}_counters"
        self._idle: list[psycopg.Connection] = []
        self._lock = threading.Lock()
        self.guard = Guard(source or f"postgres {target(dsn)}", (psycopg.Error,), self._probe)

    def _connect(self) -> psycopg.Connection:
        # Bounded waits, unless the DSN sets its own: connecting, data the server does not acknowledge
        # (a partition mid-query), and on the server a statement or a lock wait that outlives the
        # caller's deadline (its caller has given up by then).
        given = conninfo_to_dict(self._dsn)
        bounds: dict[str, str | int] = {"connect_timeout": max(2, int(self._timeout)), "tcp_user_timeout": 1000}
        extra = {k: v for k, v in bounds.items() if k not in given}
        options = str(given.get("options") or "")
        for name, ms in (("statement_timeout", _STATEMENT_MS), ("lock_timeout", _LOCK_MS)):
            if name not in options:
                options = f"{options} -c {name}={ms}".strip()
        conn = psycopg.connect(make_conninfo(self._dsn, **extra, options=options), autocommit=True)
        try:
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
        except BaseException:
            conn.close()
            raise
        return conn

    def _attempt(self, work: Callable[[psycopg.Connection], T], ticket: Abandoned, *, retry: bool) -> T:
        """On a worker thread: `work` on a pooled connection (a new one if none is idle). A pooled
        connection found dead (the server restarted, an outage ended) is dropped with every idle one,
        and an idempotent `work` (`retry`) is run once more on a new connection instead of failing."""
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        pooled = conn is not None
        if conn is None:
            conn = self._connect()
        try:
            result = work(conn)
        except psycopg.Error:
            broken = conn.closed or conn.broken
            conn.close()
            if broken:
                self._drop_idle()
            if not (pooled and broken and retry) or ticket.abandoned:
                raise
            return self._attempt(work, ticket, retry=False)
        # A call that answered after its caller gave up (a slow connect, a lock released) leaves a
        # working connection: kept. One that never answers stays on its thread until the server-side
        # bounds or the network end it, and is closed then (above).
        if conn.closed or conn.broken:
            conn.close()
        else:
            with self._lock:
                if len(self._idle) < _IDLE:
                    self._idle.append(conn)
                    conn = None
            if conn is not None:
                conn.close()
        return result

    def _drop_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _run(self, work: Callable[[psycopg.Connection], T], *, retry: bool = True) -> T:
        return self.guard.run(lambda ticket: self._attempt(work, ticket, retry=retry))

    def _probe(self) -> None:
        """The read every cached store makes (so a lock on the counters table keeps the backend down)."""
        self._attempt(
            lambda conn: conn.execute(f"SELECT version FROM {self._counters} LIMIT 1").fetchone(),
            Abandoned(),
            retry=True,
        )

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

        return self._run(work, retry=False)  # a commit whose answer was lost may have happened

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

        return self._run(work, retry=False)

    def reachable(self) -> bool:
        """Whether the backend answers now, within the deadline (False at once while marked down)."""
        try:
            self._run(lambda conn: conn.execute(f"SELECT version FROM {self._counters} LIMIT 1").fetchone())
        except Exception:  # StateUnavailable, or the table missing: not reachable
            return False
        return True

    def close(self) -> None:
        self.guard.close()
        self._drop_idle()
