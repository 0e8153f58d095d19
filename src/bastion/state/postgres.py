"""Quotas and privacy budgets in PostgreSQL: one ledger for every replica, for teams that run
PostgreSQL and not Redis.

`PostgresLedger` is the `Ledger` of `bastion.state.leased.LeasedStateStore` kept in one
table: taking a block locks the principal's row (`SELECT ... FOR UPDATE`) in a
transaction, so however many servers lease at once the total never passes the
limit. Workers spend their blocks in memory, so the database sees one short
transaction per block, not one per request.

A database that cannot be reached fails closed: the request gets 503
`state_unavailable` and is not answered. Every call has a client-side deadline (`DEADLINE`,
lock wait and connecting included): a database that accepts and never answers, or a row lock held
by another session, costs the request at most that long (on the event loop, which goes on serving
everything else), and the connection it was using is discarded. The server side is bounded too
(`statement_timeout`, `lock_timeout` on the connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable
from typing import TypeVar

import psycopg

from bastion.errors import StateUnavailable
from bastion.records import target
from bastion.state.base import BUDGET_SLACK, unavailable
from bastion.state.leased import Book, LeasedStateStore, Return, block_size

log = logging.getLogger("bastion.state")
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
T = TypeVar("T")
DEADLINE = 1.0  # seconds a request waits for the ledger (a lease is one short transaction)


class PostgresLedger:
    def __init__(self, dsn: str, *, table: str = "bastion_ledger", timeout: float = 2.0) -> None:
        if not _IDENTIFIER.match(table):
            raise ValueError(f"table name {table!r}: lower-case letters, digits and _ only")
        self._dsn, self._table, self._timeout = dsn, table, timeout
        self._source = f"state.postgres_dsn, {target(dsn)}"
        self._conn: psycopg.AsyncConnection | None = None
        self._lock = asyncio.Lock()  # one connection, one transaction at a time: leases are rare

    async def _connection(self) -> psycopg.AsyncConnection:
        if self._conn is None or self._conn.closed:
            conn = await psycopg.AsyncConnection.connect(
                self._dsn,
                connect_timeout=int(self._timeout),
                tcp_user_timeout=1000,
                options=f"-c statement_timeout={int(DEADLINE * 2000)} -c lock_timeout={int(DEADLINE * 1000)}",
            )
            async with conn.transaction():
                # CREATE TABLE IF NOT EXISTS races with itself (a unique violation in pg_type) when
                # replicas start together: an advisory lock makes the first one create it alone.
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self._table,))
                await conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {self._table} (book text NOT NULL, principal text NOT NULL, "
                    "period bigint NOT NULL, taken double precision NOT NULL, PRIMARY KEY (book, principal))"
                )
            self._conn = conn
        return self._conn

    async def take(
        self, book: Book, principal: str, period: int, *, limit: float, need: float, cap: float, ttl: float
    ) -> tuple[float, float]:
        async def work(conn: psycopg.AsyncConnection) -> tuple[float, float]:
            async with conn.transaction():
                await conn.execute(
                    f"INSERT INTO {self._table} VALUES (%s, %s, %s, 0) ON CONFLICT DO NOTHING",
                    (book.name, principal, period),
                )
                cur = await conn.execute(
                    f"SELECT period, taken FROM {self._table} WHERE book = %s AND principal = %s FOR UPDATE",
                    (book.name, principal),
                )
                row = await cur.fetchone()
                assert row is not None
                taken = row[1] if row[0] == period else 0.0
                left = limit - taken
                if left < need - BUDGET_SLACK:
                    return 0.0, max(0.0, left)
                amount = block_size(left, need, cap)
                await conn.execute(
                    f"UPDATE {self._table} SET period = %s, taken = %s WHERE book = %s AND principal = %s",
                    (period, taken + amount, book.name, principal),
                )
            return amount, left - amount

        return await self._guarded(work)

    async def _guarded(self, work: Callable[[psycopg.AsyncConnection], Awaitable[T]]) -> T:
        """`work` on the connection, within `DEADLINE` (waiting for the lock included); raises
        StateUnavailable (503) on a failure or the deadline, dropping the connection on the latter."""
        try:
            async with asyncio.timeout(DEADLINE), self._lock:
                return await work(await self._connection())
        except TimeoutError as e:
            await self._discard()
            raise unavailable(e, self._source) from None
        except psycopg.Error as e:
            raise unavailable(e, self._source) from None

    async def _discard(self) -> None:
        """Drop the connection a call was cut off on: its state (a transaction, a query) is unknown."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 0.1)

    async def left(self, book: Book, principal: str, period: int, *, limit: float) -> float:
        async def work(conn: psycopg.AsyncConnection) -> tuple[int, float] | None:
            cur = await conn.execute(
                f"SELECT period, taken FROM {self._table} WHERE book = %s AND principal = %s",
                (book.name, principal),
            )
            row = await cur.fetchone()
            await conn.commit()
            return None if row is None else (int(row[0]), float(row[1]))

        row = await self._guarded(work)
        return limit - (row[1] if row is not None and row[0] == period else 0.0)

    def give_back(self, returns: list[Return]) -> None:
        if not returns:
            return
        # At shutdown, perhaps with no event loop left: a short-lived blocking connection.
        try:
            with psycopg.connect(self._dsn, connect_timeout=int(self._timeout)) as conn:
                for book, principal, period, amount in returns:
                    conn.execute(
                        f"UPDATE {self._table} SET taken = taken - %s "
                        "WHERE book = %s AND principal = %s AND period = %s",
                        (amount, book.name, principal, period),
                    )
        except psycopg.Error as e:  # the blocks are forfeited: under-serving, never over-serving
            log.warning("could not return leased blocks to PostgreSQL: %s", type(e).__name__)

    def close(self) -> None:
        """Nothing to flush; `aclose` closes the connection on its event loop."""

    async def aclose(self) -> None:
        if self._conn is not None:
            await self._conn.close()

    async def reachable(self) -> bool:
        async def work(conn: psycopg.AsyncConnection) -> None:
            await conn.execute("SELECT 1")
            await conn.commit()

        try:
            await self._guarded(work)
        except StateUnavailable:
            return False
        return True


class PostgresStateStore(LeasedStateStore):
    """Quotas and privacy budgets shared by replicas through one PostgreSQL table."""

    def __init__(self, dsn: str, *, table: str = "bastion_ledger") -> None:
        super().__init__(PostgresLedger(dsn, table=table))
