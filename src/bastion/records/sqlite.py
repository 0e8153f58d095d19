"""`Records` in a SQLite file in the state directory: the embedded default's implementation of the
shared-records interface, for the stores written only over it (token revocations, dashboard
sessions; `bastion.tokens`, `bastion.sessions`).

Every process on one state directory (the workers of `bastion serve --workers`, the CLI) opens the
same file (WAL), so a change made by one is seen by the others at their next counter check. A swap
is one `BEGIN IMMEDIATE` transaction: compare, write or delete, move the collection's counter.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from bastion.files import open_shared_sqlite
from bastion.records import unavailable
from bastion.sqlite_wait import LOCK_WAIT_SECONDS

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    collection TEXT NOT NULL,
    key        TEXT NOT NULL,
    value      TEXT NOT NULL,
    PRIMARY KEY (collection, key)
);
CREATE TABLE IF NOT EXISTS counters (
    collection TEXT PRIMARY KEY,
    version    INTEGER NOT NULL DEFAULT 0,
    seq        INTEGER NOT NULL DEFAULT 0
);
"""


class SQLiteRecords:
    """One connection per process, behind a lock. Raises `StateUnavailable` when the file cannot be
    read or written (a full disk, a write lock held past LOCK_WAIT_SECONDS, 1.5 s)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            try:
                if self._conn is None:
                    self._conn = open_shared_sqlite(self._path, _SCHEMA)
                    # A writer stopped mid-swap (a hung sibling worker) holds the lock: wait for it
                    # at most LOCK_WAIT_SECONDS, then StateUnavailable (503), not 5 s.
                    self._conn.execute(f"PRAGMA busy_timeout={int(LOCK_WAIT_SECONDS * 1000)}")
                return work(self._conn)
            except sqlite3.Error as e:
                raise unavailable(e) from None

    def get(self, collection: str, key: str) -> str | None:
        def work(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(
                "SELECT value FROM records WHERE collection = ? AND key = ?", (collection, key)
            ).fetchone()
            return None if row is None else str(row[0])

        return self._run(work)

    def items(self, collection: str) -> dict[str, str]:
        def work(conn: sqlite3.Connection) -> dict[str, str]:
            rows = conn.execute("SELECT key, value FROM records WHERE collection = ?", (collection,))
            return {str(k): str(v) for k, v in rows}

        return self._run(work)

    def swap(self, collection: str, key: str, old: str | None, new: str | None) -> bool:
        if old is None and new is None:
            return False

        def work(conn: sqlite3.Connection) -> bool:
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute(
                    "SELECT value FROM records WHERE collection = ? AND key = ?", (collection, key)
                ).fetchone()
                if (None if row is None else str(row[0])) != old:
                    conn.execute("ROLLBACK")
                    return False
                if new is None:
                    conn.execute("DELETE FROM records WHERE collection = ? AND key = ?", (collection, key))
                else:
                    conn.execute("INSERT OR REPLACE INTO records VALUES (?, ?, ?)", (collection, key, new))
                conn.execute(
                    "INSERT INTO counters (collection, version) VALUES (?, 1) "
                    "ON CONFLICT (collection) DO UPDATE SET version = version + 1",
                    (collection,),
                )
                conn.execute("COMMIT")
                return True
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

        return self._run(work)

    def version(self, collection: str) -> int:
        def work(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT version FROM counters WHERE collection = ?", (collection,)).fetchone()
            return 0 if row is None else int(row[0])

        return self._run(work)

    def next_id(self, collection: str) -> int:
        def work(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "INSERT INTO counters (collection, seq) VALUES (?, 1) "
                "ON CONFLICT (collection) DO UPDATE SET seq = seq + 1 RETURNING seq",
                (collection,),
            ).fetchone()
            assert row is not None
            return int(row[0])

        return self._run(work)

    def reachable(self) -> bool:
        try:
            self._run(lambda conn: conn.execute("SELECT 1").fetchone())
        except Exception:
            return False
        return True

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
