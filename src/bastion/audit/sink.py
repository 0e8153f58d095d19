"""Where the audit chain is stored: a narrow interface, and the embedded SQLite sink.

A sink writes a batch of record bodies as one transaction in three steps:

1. `begin` takes the store's write lock, opens the transaction and reads the tail (last
   record, last checkpoint) inside it; `try_begin` does the same only if it need not wait.
2. `stage` links the batch onto that tail with the shared `ChainExtender` (each body gets
   its `seq`) and inserts the rows and any checkpoint due, in the open transaction.
3. `commit` commits and lets the lock go; `abort` rolls back and lets it go.

Several writers (worker processes, replicas) may write one sink at once: the chain has one
order and no gap whoever writes, and no writer keeps the head in memory between batches.

Why three steps: the `AuditLog` above runs `stage` (encoding, hashing, signing, SQLite's
inserts into its page cache) on the event loop and only the steps that wait (the lock, the
fsync, the network) on a helper thread. Measured on this code base, a thread doing the
Python work of a batch slowed every stage of the request path 3-4x through GIL hand-offs;
a thread that only waits does not.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bastion.audit.chain import GENESIS, SCHEMA, ChainExtender, Tail
from bastion.statedir import PRIVATE_FILE, StatePaths, make_private_sqlite

if TYPE_CHECKING:
    from bastion.config import AuditSettings

_WAL_CHECKPOINT_EVERY = 200  # commits between passive WAL checkpoints
# Writers queue on the flock first: SQLite's own wait is a backstop (a checkpointer). The lock wait
# a request sees is bounded above it: the AuditLog answers 503 past LOCK_WAIT_SECONDS (1.5 s).
_BUSY_TIMEOUT_MS = 10_000
_CLOSE_LOCK_WAIT = 2.0  # seconds: at shutdown, past this the WAL is left for a later close to truncate


class AuditSink:
    """The storage of one audit chain (abstract). `begin`, `commit`, `probe` and `append` may
    block; `try_begin`, `stage` and `abort` do not (the `AuditLog` calls them on its event loop)."""

    name: str  # for messages: a path, or "postgresql table t" (never a DSN: it may hold a password)
    # True: a failed commit may succeed later (a network store): the log refuses records while it
    # probes, then resumes. False: a failure (disk full, a read-only file) stops the log for good.
    recoverable: bool
    # True: `commit` does not wait for a disk or a network, the log calls it on its event loop.
    inline_commit: bool = False
    # True: the log calls `stage` on its event loop (between `begin` and `commit` on its thread).
    # False: the whole transaction runs on the helper thread (`append`).
    stage_on_loop: bool = True
    checkpoint_every_seconds: float  # records past the last checkpoint get one within this long
    # Seconds the log waits for a blocking step (`append`, `begin`, `commit`, `probe`) before it
    # answers 503 and calls `interrupt`; None: no client-side deadline (a local disk).
    deadline: float | None = None

    def try_begin(self) -> Tail | None:
        """The write lock, an open transaction and the tail, if that needs no wait; else None."""
        return None

    def begin(self) -> Tail:
        """The write lock, an open transaction and the tail (waits for the lock). Raises the
        store's own error, with nothing held."""
        raise NotImplementedError

    def stage(
        self, tail: Tail, bodies: list[dict[str, Any]], now: float, *, final: bool = False
    ) -> list[int]:
        """Link `bodies` onto `tail` (setting each one's `seq`) and insert them with any checkpoint
        due at `now` (Unix seconds; `final`: one over the head whenever records follow the last).
        Returns their sequence numbers, valid once `commit` returns."""
        raise NotImplementedError

    def commit(self) -> None:
        """Commit and release the lock. Raises the store's own error, with nothing committed or held."""
        raise NotImplementedError

    def abort(self) -> None:
        """Roll back whatever is open and release the lock."""
        raise NotImplementedError

    def append(self, bodies: list[dict[str, Any]], now: float, *, final: bool = False) -> list[int]:
        """All three steps at once (blocking): at shutdown, and for tools and tests."""
        tail = self.begin()
        try:
            seqs = self.stage(tail, bodies, now, final=final)
        except BaseException:
            self.abort()
            raise
        self.commit()
        return seqs

    def probe(self) -> bool:
        """Whether the store answers now (reconnecting if needed)."""
        raise NotImplementedError

    def interrupt(self) -> None:
        """Called from another thread when a blocking step passed `deadline`: make it return (raise)
        soon, leaving nothing held. Must not block."""

    def close(self) -> None:
        raise NotImplementedError


class SQLiteSink(AuditSink):
    """The embedded default: the chain in one SQLite file (WAL), shared by the processes of one host.

    A writer takes an `flock` of `audit.db.lock`, then `BEGIN IMMEDIATE` (SQLite's write
    lock), and reads the tail inside it: worker processes on one state directory append to
    one chain. The flock comes first because SQLite's own busy wait polls with sleeps of up to
    100 ms: under load the writer that just committed takes the lock again and the others
    starve, while a blocked flock is woken the moment the lock is released. Uncontended (one
    process), `try_begin` gets both at once on the event loop.
    `fsync`: FULL synchronous (each commit reaches the disk; committed on the helper thread)
    or NORMAL (survives a process crash, not a power loss; committed on the event loop).
    """

    recoverable = False

    def __init__(
        self,
        path: Path,
        signing_key: Ed25519PrivateKey,
        *,
        checkpoint_every_records: int = 1000,
        checkpoint_every_seconds: float = 60.0,
        fsync: bool = True,
    ) -> None:
        make_private_sqlite(path)  # the records: owner-only, -wal and -shm too
        self.path = path
        self.name = str(path)
        self.checkpoint_every_seconds = checkpoint_every_seconds
        self.inline_commit = not fsync
        self._extender = ChainExtender(
            signing_key, every_records=checkpoint_every_records, every_seconds=checkpoint_every_seconds
        )
        lock = path.with_name(path.name + ".lock")
        self._lock_fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE)
        self._locked = False
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
        # Under the writers' lock: switching a fresh file to WAL needs SQLite's exclusive lock, and
        # that wait does not go through the busy handler ("database is locked" at once when several
        # workers open a new state directory together).
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.executescript(SCHEMA)
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        self._conn.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
        # SQLite's automatic WAL checkpoint would run inside some unlucky COMMIT and stall every request
        # waiting on it; instead a second connection checkpoints passively beside the writer.
        self._conn.execute("PRAGMA wal_autocheckpoint=0")
        self._wal_conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._wal_conn.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
        self._wal_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bastion-audit-wal")
        self._wal_running: Future[Any] | None = None
        self._commits = 0

    def try_begin(self) -> Tail | None:
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None  # another process is writing: wait for it on the helper thread
        return self._open()

    def begin(self) -> Tail:
        # A blocking wait (woken fairly, the moment the lock is let go): the AuditLog bounds it by
        # answering 503 past LOCK_WAIT_SECONDS while this goes on waiting on its thread.
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        return self._open()

    def _open(self) -> Tail:
        self._locked = True
        try:
            self._conn.execute("BEGIN IMMEDIATE")  # every writer holds the flock: no wait here
            last = self._conn.execute("SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1").fetchone()
            cp = self._conn.execute(
                "SELECT seq, signed_at FROM checkpoints ORDER BY seq DESC LIMIT 1"
            ).fetchone()
        except BaseException:
            self.abort()
            raise
        return Tail(
            seq=last[0] if last else 0,
            hash=last[1] if last else GENESIS,
            checkpoint_seq=cp[0] if cp else 0,
            checkpoint_at=cp[1] if cp else 0.0,
        )

    def stage(
        self, tail: Tail, bodies: list[dict[str, Any]], now: float, *, final: bool = False
    ) -> list[int]:
        rows, checkpoints = self._extender.extend(tail, bodies, now, final=final)
        if rows:
            self._conn.executemany("INSERT INTO records VALUES (?, ?, ?, ?)", rows)
        if checkpoints:
            self._conn.executemany("INSERT INTO checkpoints VALUES (?, ?, ?, ?)", checkpoints)
        return [row[0] for row in rows]

    def commit(self) -> None:
        try:
            self._conn.execute("COMMIT")
        except BaseException:
            self.abort()
            raise
        self._unlock()
        self._commits += 1
        if self._commits % _WAL_CHECKPOINT_EVERY == 0 and (
            self._wal_running is None or self._wal_running.done()
        ):
            self._wal_running = self._wal_executor.submit(
                self._wal_conn.execute, "PRAGMA wal_checkpoint(PASSIVE)"
            )

    def abort(self) -> None:
        try:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
        finally:
            self._unlock()

    def _unlock(self) -> None:
        if self._locked:
            self._locked = False
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def probe(self) -> bool:
        try:
            self._conn.execute("SELECT 1 FROM records LIMIT 1").fetchall()
        except sqlite3.Error:
            return False
        return True

    def close(self) -> None:
        self._wal_executor.shutdown()
        # TRUNCATE holds SQLite's write lock while it runs: other writers wait on the flock instead.
        # Bounded: a sibling stopped while holding the lock must not hang this one's shutdown.
        deadline = time.monotonic() + _CLOSE_LOCK_WAIT
        locked = False
        while not locked and time.monotonic() < deadline:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
            except BlockingIOError:
                time.sleep(0.01)
        if locked:
            with contextlib.suppress(sqlite3.OperationalError):  # busy: a reader; a later close truncates it
                self._wal_conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._wal_conn.close()
        self._conn.close()
        os.close(self._lock_fd)


def signing_key_path(settings: AuditSettings, paths: StatePaths) -> Path:
    """The checkpoint signing key: `[audit] signing_key`, else the state directory's own."""
    return settings.signing_key if settings.signing_key is not None else paths.audit_key


def open_sink(settings: AuditSettings, paths: StatePaths) -> AuditSink:
    """The sink `[audit] sink` names, signing with the key `signing_key_path` finds (created if missing).

    Raises ConfigError when a PostgreSQL table is signed with another key."""
    from bastion.audit.chain import load_or_create_audit_key

    key = load_or_create_audit_key(signing_key_path(settings, paths))
    records, seconds = settings.checkpoint_every_records, settings.checkpoint_every_seconds
    if settings.sink == "postgres":
        from bastion.audit.postgres import PostgresSink  # psycopg only when it is used

        return PostgresSink(
            settings.postgres_dsn,
            key,
            table=settings.postgres_table,
            fsync=settings.fsync,
            checkpoint_every_records=records,
            checkpoint_every_seconds=seconds,
        )
    return SQLiteSink(
        paths.audit,
        key,
        fsync=settings.fsync,
        checkpoint_every_records=records,
        checkpoint_every_seconds=seconds,
    )
