"""The audit writer: group commit on the event loop, signed checkpoints.

A request chains its record (sequence number, canonical JSON, SHA-256 link: a
few microseconds) and appends the row to the pending batch. The first record of
a batch schedules one flush for the end of the current loop iteration; every
record that arrives before then joins it. The flush inserts the batch on the
loop, then hands only the COMMIT (the fsync) to a helper thread; while it runs,
new records gather for the next batch, and when it ends the waiting requests are
answered. Measured: a writer thread doing the Python work of encoding and
inserting made every stage of the request path 3-4x slower through GIL
hand-offs; a thread that only waits on the disk does not.

One writer per database: the chain's order is decided in this process. If a
commit fails (disk full), the log refuses every later record: requests in
"sync" durability then fail closed with 503 until an operator intervenes.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bastion.audit.chain import GENESIS, SCHEMA, chain_hash, checkpoint_message, encode_body
from bastion.errors import BastionException
from bastion.statedir import make_private_sqlite

log = logging.getLogger("bastion.audit")

_Row = tuple[int, str, str, str]  # seq, body, prev_hash, hash
_WAL_CHECKPOINT_EVERY = 200  # commits between passive WAL checkpoints


class AuditUnavailable(BastionException):
    """The audit record could not be committed; in sync mode the request must fail closed."""


class AuditLog:
    def __init__(
        self,
        path: Path,
        signing_key: Ed25519PrivateKey,
        *,
        checkpoint_every_records: int = 1000,
        checkpoint_every_seconds: float = 60.0,
        fsync: bool = True,
        flush_delay: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        make_private_sqlite(path)  # the records: owner-only, -wal and -shm too
        self.path = path
        self._key = signing_key
        self._every_records = checkpoint_every_records
        self._every_seconds = checkpoint_every_seconds
        self._clock = clock
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        # FULL: each commit reaches the disk (survives power loss). NORMAL: survives a process crash.
        self._conn.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
        # SQLite's automatic WAL checkpoint would run inside some unlucky COMMIT and stall every request
        # waiting on it; instead a second connection checkpoints passively beside the writer.
        self._conn.execute("PRAGMA wal_autocheckpoint=0")
        self._wal_conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._wal_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bastion-audit-wal")
        self._wal_running: Future[Any] | None = None
        self._commits = 0
        self._conn.executescript(SCHEMA)
        row = self._conn.execute("SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1").fetchone()
        self._seq: int = row[0] if row else 0
        self._head: str = row[1] if row else GENESIS
        cp = self._conn.execute("SELECT seq FROM checkpoints ORDER BY seq DESC LIMIT 1").fetchone()
        self._checkpointed_seq: int = cp[0] if cp else 0
        self._last_checkpoint_at = clock()
        self._rows: list[_Row] = []
        self._waiters: list[tuple[asyncio.Future[int], int]] = []
        self._flush_scheduled = False
        self._fsync = fsync
        # Nobody waits on a best-effort record, so its batch may gather for a few milliseconds.
        self._flush_delay = flush_delay
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bastion-audit-commit")
        self._in_flight: Future[Any] | None = None
        self._in_flight_batch: tuple[int, float] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.healthy = True

    def submit(self, body: dict[str, Any], *, wait: bool) -> asyncio.Future[int] | None:
        """Chain and queue a record. With wait=True, return a future resolved once it is committed.

        Without a running event loop (shutdown, after the server's loop ended) only wait=False is
        possible: the record is queued and `close()` writes it.
        """
        if not self.healthy:
            raise AuditUnavailable("audit log is not writable")
        loop: asyncio.AbstractEventLoop | None = None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            if wait:
                raise
        seq = self._seq + 1
        body["seq"] = seq
        encoded = encode_body(body)
        head = chain_hash(self._head, encoded)
        self._rows.append((seq, encoded.decode(), self._head, head))
        self._seq, self._head = seq, head
        if loop is None:
            return None
        if not self._flush_scheduled:
            self._flush_scheduled = True
            if self._flush_delay and not wait:
                loop.call_later(self._flush_delay, self._flush)
            else:
                loop.call_soon(self._flush)
        if not wait:
            return None
        future: asyncio.Future[int] = loop.create_future()
        self._waiters.append((future, seq))
        return future

    def close(self) -> None:
        """Write what is pending and a final checkpoint, then close the database."""
        if self._timer is not None:
            self._timer.cancel()
        if self._in_flight is not None and self._in_flight_batch is not None:
            self._in_flight.result()  # let the commit under way finish; its waiters' loop is gone
            self._checkpointed_seq, self._last_checkpoint_at = self._in_flight_batch
        if self.healthy:
            batch = self._begin(final=True)
            if batch is not None:
                self._conn.execute("COMMIT")
        self._executor.shutdown()
        self._wal_executor.shutdown()
        self._wal_conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._wal_conn.close()
        self._conn.close()

    def _flush(self) -> None:
        """Start a group commit of everything pending, unless one is already under way."""
        self._flush_scheduled = False
        if self._in_flight is not None or not self.healthy:
            return  # the commit under way picks the pending rows up when it ends
        waiters = self._waiters
        self._waiters = []
        try:
            batch = self._begin(final=False)
        except Exception as e:
            self._fail(e, waiters)
            return
        if batch is None:
            return
        if not self._fsync:  # no disk wait: commit inline, cheaper than a thread hop
            self._end(waiters, batch, self._commit_inline())
            return
        # The fsync happens off the loop; requests keep flowing and queue up for the next batch.
        self._in_flight = self._executor.submit(self._conn.execute, "COMMIT")
        self._in_flight_batch = batch
        done = asyncio.wrap_future(self._in_flight)
        done.add_done_callback(lambda f: self._end(waiters, batch, f.exception()))

    def _commit_inline(self) -> BaseException | None:
        try:
            self._conn.execute("COMMIT")
        except Exception as e:
            return e
        return None

    def _begin(self, *, final: bool) -> tuple[int, float] | None:
        """Insert pending rows (and due checkpoints) in an open transaction; return (checkpointed seq, time)."""
        rows, self._rows = self._rows, []
        now = self._clock()
        last_cp = self._checkpointed_seq
        checkpoints = []
        for seq, _, _, head in rows:
            if seq - last_cp >= self._every_records:  # at most N records between checkpoints
                checkpoints.append(self._checkpoint(seq, head, now))
                last_cp = seq
        if self._seq > last_cp and (final or now - self._last_checkpoint_at >= self._every_seconds):
            checkpoints.append(self._checkpoint(self._seq, self._head, now))
            last_cp = self._seq
        if not rows and not checkpoints:
            return None
        self._conn.execute("BEGIN")
        try:
            self._conn.executemany("INSERT INTO records VALUES (?, ?, ?, ?)", rows)
            self._conn.executemany("INSERT INTO checkpoints VALUES (?, ?, ?, ?)", checkpoints)
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        return (last_cp, now) if checkpoints else (self._checkpointed_seq, self._last_checkpoint_at)

    def _end(
        self,
        waiters: list[tuple[asyncio.Future[int], int]],
        batch: tuple[int, float],
        error: BaseException | None,
    ) -> None:
        self._in_flight = None
        if error is not None:
            self._fail(error, waiters)
            return
        self._checkpointed_seq, self._last_checkpoint_at = batch
        self._commits += 1
        if self._commits % _WAL_CHECKPOINT_EVERY == 0 and (
            self._wal_running is None or self._wal_running.done()
        ):
            self._wal_running = self._wal_executor.submit(
                self._wal_conn.execute, "PRAGMA wal_checkpoint(PASSIVE)"
            )
        for future, seq in waiters:
            if not future.done():
                future.set_result(seq)
        if self._rows and not self._flush_scheduled:
            if self._flush_delay and not self._waiters:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_later(self._flush_delay, self._flush)
            else:
                self._flush()
        self._arm_checkpoint_timer()

    def _fail(self, error: BaseException, waiters: list[tuple[asyncio.Future[int], int]]) -> None:
        self.healthy = False
        log.critical("audit log commit failed, refusing further requests: %s", type(error).__name__)
        for future, _ in [*waiters, *self._waiters]:
            if not future.done():
                future.set_exception(AuditUnavailable(type(error).__name__))
        self._waiters = []

    def _arm_checkpoint_timer(self) -> None:
        """Records past the last checkpoint get one within `checkpoint_every_seconds`, even when idle."""
        if self._timer is not None or self._seq <= self._checkpointed_seq:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._timer = loop.call_later(self._every_seconds, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if not self._flush_scheduled:
            self._flush()

    def _checkpoint(self, seq: int, head: str, now: float) -> tuple[int, str, float, str]:
        return (seq, head, now, self._key.sign(checkpoint_message(seq, head)).hex())
