"""Quotas and privacy budgets in PostgreSQL: one ledger for every replica, for teams that run
PostgreSQL and not Redis.

`PostgresLedger` is the `Ledger` of `bastion.state.leased.LeasedStateStore` kept in one
table: taking a block locks the principal's row (`SELECT ... FOR UPDATE`) in a
transaction, so however many servers lease at once the total never passes the
limit. Workers spend their blocks in memory, so the database sees one short
transaction per block, not one per request.

A database that cannot be reached fails closed: the request gets 503
`state_unavailable` and is not answered.
"""

from __future__ import annotations

import asyncio
import logging
import re

import psycopg

from bastion.state.base import BUDGET_SLACK, unavailable
from bastion.state.leased import Book, LeasedStateStore, Return, block_size

log = logging.getLogger("bastion.state")
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class PostgresLedger:
    def __init__(self, dsn: str, *, table: str = "bastion_ledger", timeout: float = 2.0) -> None:
        if not _IDENTIFIER.match(table):
            raise ValueError(f"table name {table!r}: lower-case letters, digits and _ only")
        self._dsn, self._table, self._timeout = dsn, table, timeout
        self._conn: psycopg.AsyncConnection | None = None
        self._lock = asyncio.Lock()  # one connection, one transaction at a time: leases are rare

    async def _connection(self) -> psycopg.AsyncConnection:
        if self._conn is None or self._conn.closed:
            conn = await psycopg.AsyncConnection.connect(self._dsn, connect_timeout=int(self._timeout))
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
        async with self._lock:
            try:
                conn = await self._connection()
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
            except psycopg.Error as e:
                raise unavailable(e) from None

    async def left(self, book: Book, principal: str, period: int, *, limit: float) -> float:
        async with self._lock:
            try:
                conn = await self._connection()
                cur = await conn.execute(
                    f"SELECT period, taken FROM {self._table} WHERE book = %s AND principal = %s",
                    (book.name, principal),
                )
                row = await cur.fetchone()
                await conn.commit()
            except psycopg.Error as e:
                raise unavailable(e) from None
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
        async with self._lock:
            try:
                conn = await self._connection()
                await conn.execute("SELECT 1")
                await conn.commit()
            except psycopg.Error:
                return False
        return True


class PostgresStateStore(LeasedStateStore):
    """Quotas and privacy budgets shared by replicas through one PostgreSQL table."""

    def __init__(self, dsn: str, *, table: str = "bastion_ledger") -> None:
        super().__init__(PostgresLedger(dsn, table=table))
