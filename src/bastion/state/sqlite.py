"""The SQLite ledger: quotas and privacy budgets that survive a restart, shared by one host's workers."""

from __future__ import annotations

import functools
import logging
import sqlite3
from pathlib import Path

from bastion.files import enable_wal
from bastion.sqlite_wait import LOCK_WAIT_SECONDS, is_busy, retry_busy
from bastion.state.base import BUDGET_SLACK, unavailable
from bastion.state.leased import BUDGET, QUOTA, Book, LeasedStateStore, Return, block_size
from bastion.statedir import make_private_sqlite

log = logging.getLogger("bastion.state")


class SQLiteLedger:
    """The ledger in a SQLite file (WAL): one host, any number of worker processes."""

    def __init__(self, path: Path) -> None:
        make_private_sqlite(path)  # budgets and quotas per principal: owner-only, -wal and -shm too
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        enable_wal(self._conn)
        # WAL + NORMAL: a commit survives a process crash without an fsync.
        self._conn.execute("PRAGMA synchronous=NORMAL")
        # The schema under sqlite3's 5 s busy wait (at open only): workers opening a fresh file
        # together otherwise got "database is locked" at once here (seen in CI).
        for book, kind in ((QUOTA, "INTEGER"), (BUDGET, "REAL")):
            self._conn.execute(
                f"CREATE TABLE IF NOT EXISTS {book.name} (principal TEXT PRIMARY KEY, "
                f"{book.period} INTEGER NOT NULL, {book.taken} {kind} NOT NULL, version INTEGER NOT NULL)"
            )
        # Then no busy wait on the event loop: a write lock another process holds (a worker stopped
        # mid-write) is retried between asyncio.sleeps for LOCK_WAIT_SECONDS, then 503.
        self._conn.execute("PRAGMA busy_timeout=0")

    async def take(
        self, book: Book, principal: str, period: int, *, limit: float, need: float, cap: float, ttl: float
    ) -> tuple[float, float]:
        while True:  # compare-and-swap on the row's version
            row = self._read(book, principal)
            taken = row[1] if row is not None and row[0] == period else 0
            left = limit - taken
            if left < need - BUDGET_SLACK:
                return 0, max(0, left)
            amount = block_size(left, need, cap)
            if row is None:
                sql = f"INSERT OR IGNORE INTO {book.name} VALUES (?, ?, ?, 1)"
                args: tuple[object, ...] = (principal, period, amount)
            else:
                sql = (
                    f"UPDATE {book.name} SET {book.period} = ?, {book.taken} = ?, "
                    "version = version + 1 WHERE principal = ? AND version = ?"
                )
                args = (period, taken + amount, principal, row[2])
            try:
                try:
                    cur = self._conn.execute(sql, args)
                except sqlite3.OperationalError as e:
                    if not is_busy(e):
                        raise
                    # Another process holds the write lock: retry off the loop's critical path.
                    cur = await retry_busy(functools.partial(self._conn.execute, sql, args))
            except sqlite3.Error as e:
                raise unavailable(e) from None
            if cur.rowcount == 1:
                return amount, left - amount
            # Another worker leased first: read again.

    async def left(self, book: Book, principal: str, period: int, *, limit: float) -> float:
        row = self._read(book, principal)
        return limit - (row[1] if row is not None and row[0] == period else 0)

    def _read(self, book: Book, principal: str) -> tuple[int, float, int] | None:
        try:
            row = self._conn.execute(
                f"SELECT {book.period}, {book.taken}, version FROM {book.name} WHERE principal = ?",
                (principal,),
            ).fetchone()
        except sqlite3.Error as e:
            raise unavailable(e) from None
        return None if row is None else (row[0], row[1], row[2])

    def give_back(self, returns: list[Return]) -> None:
        # At shutdown, off the request path: SQLite's own wait, bounded.
        self._conn.execute(f"PRAGMA busy_timeout={int(LOCK_WAIT_SECONDS * 1000)}")
        for book, principal, period, amount in returns:
            self._conn.execute(
                f"UPDATE {book.name} SET {book.taken} = {book.taken} - ?, version = version + 1 "
                f"WHERE principal = ? AND {book.period} = ?",
                (amount, principal, period),
            )

    def close(self) -> None:
        self._conn.close()

    async def aclose(self) -> None:
        self.close()

    async def reachable(self) -> bool:
        return True  # a local file: a failing disk shows in the requests' 503s and the audit log


class SQLiteStateStore(LeasedStateStore):
    """Quotas and privacy budgets that survive a restart, shared by the workers of one host."""

    def __init__(self, path: Path) -> None:
        super().__init__(SQLiteLedger(path))
