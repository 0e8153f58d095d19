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
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psycopg

from bastion.errors import StateUnavailable
from bastion.records import target
from bastion.state.base import BUDGET_SLACK, unavailable
from bastion.state.leased import Book, LeasedStateStore, Return, block_size

log = logging.getLogger("bastion.state")
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
T = TypeVar("T")
DEADLINE = 1.0  # seconds a request waits for the ledger (a lease is one short transaction)
RETRY_AFTER = 1.0  # seconds the ledger is not asked again after a call passed its deadline
_REFUSAL = "rate-limit and privacy-budget state unavailable; nothing was answered"


class PostgresLedger:
    def __init__(self, dsn: str, *, table: str = "bastion_ledger", timeout: float = 2.0) -> None:
        if not _IDENTIFIER.match(table):
            raise ValueError(f"table name {table!r}: lower-case letters, digits and _ only")
        self._dsn, self._table, self._timeout = dsn, table, timeout
        self._source = f"state.postgres_dsn, {target(dsn)}"
        self._conn: psycopg.AsyncConnection | None = None
        self._lock = asyncio.Lock()  # one connection, one transaction at a time: leases are rare
        self._down_until = 0.0

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
        StateUnavailable (503) on a failure or the deadline.

        Past the deadline the call is left behind, not awaited: cancelling a psycopg query waits for
        the server to acknowledge the cancellation (measured: 11 s behind a frozen proxy), so the call
        is cancelled in the background with its connection and lock, new calls get a new connection,
        and for `RETRY_AFTER` seconds they fail at once instead of each leaving one more behind."""
        if time.monotonic() < self._down_until:
            raise StateUnavailable(_REFUSAL, source=self._source)
        lock = self._lock

        async def attempt() -> T:
            async with lock:
                return await work(await self._connection())

        try:
            return await within_deadline(attempt, DEADLINE)
        except TimeoutError as e:
            self._lock, self._conn = asyncio.Lock(), None
            self._down_until = time.monotonic() + RETRY_AFTER
            raise unavailable(e, self._source) from None
        except psycopg.Error as e:
            raise unavailable(e, self._source) from None

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


async def within_deadline(call: Callable[[], Awaitable[T]], deadline: float) -> T:
    """`await call()` for at most `deadline` seconds, else TimeoutError. Past the deadline the call is
    left behind and cancelled in the background, not awaited: cancelling a psycopg query waits for
    the server to acknowledge it (11 s measured behind a frozen proxy), after which psycopg closes the
    connection. The caller must stop using that call's connection and lock."""
    task = asyncio.ensure_future(call())
    try:
        return await asyncio.wait_for(asyncio.shield(task), deadline)
    except TimeoutError:
        task.add_done_callback(_quietly)
        task.cancel()
        raise


def _quietly(task: asyncio.Task[Any]) -> None:
    """Retrieve a left-behind call's outcome (nobody awaits it any more)."""
    if not task.cancelled():
        task.exception()


class PostgresStateStore(LeasedStateStore):
    """Quotas and privacy budgets shared by replicas through one PostgreSQL table."""

    def __init__(self, dsn: str, *, table: str = "bastion_ledger") -> None:
        super().__init__(PostgresLedger(dsn, table=table))
