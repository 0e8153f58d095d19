"""Where the audit chain is stored: a narrow interface, and the embedded SQLite sink.

A sink appends a batch of record bodies as one transaction and returns their sequence
numbers once the transaction is committed. Several writers (worker processes, replicas)
may append to one sink at once: each append takes the sink's write lock, reads the tail
(last record, last checkpoint) inside it, links the batch onto it with the shared
`ChainExtender` and commits before letting go. So the chain has one order and no gap
whoever writes, and no writer keeps the head in memory between batches.

The `AuditLog` above a sink calls it from one helper thread per process (group commit:
one transaction per batch, however many requests wait on it).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bastion.audit.chain import GENESIS, SCHEMA, ChainExtender, Tail
from bastion.statedir import PRIVATE_FILE, StatePaths, make_private_sqlite

if TYPE_CHECKING:
    from bastion.config import AuditSettings

_WAL_CHECKPOINT_EVERY = 200  # commits between passive WAL checkpoints
_BUSY_TIMEOUT_MS = 10_000  # another process's commit holds the write lock for milliseconds, not seconds


class AuditSink(Protocol):
    """The storage of one audit chain. Blocking calls: the `AuditLog` runs them off the event loop."""

    name: str  # for messages: a path, or "postgresql table t" (never a DSN: it may hold a password)
    # True: a failed append may succeed later (a network store): the log refuses records while it
    # probes, then resumes. False: a failure (disk full, a read-only file) stops the log for good.
    recoverable: bool
    checkpoint_every_seconds: float  # records past the last checkpoint get one within this long

    def append(self, bodies: list[dict[str, Any]], now: float, *, final: bool = False) -> list[int]:
        """Link `bodies` onto the chain (setting each one's `seq`) and commit, with any checkpoint
        due at `now` (Unix seconds; `final`: one over the head whenever records follow the last).
        Returns the sequence numbers once committed; raises the store's own error when nothing was
        committed."""
        ...

    def probe(self) -> bool:
        """Whether the store answers now (reconnecting if needed)."""
        ...

    def close(self) -> None: ...


class SQLiteSink:
    """The embedded default: the chain in one SQLite file (WAL), shared by the processes of one host.

    Each append is `BEGIN IMMEDIATE` (SQLite's write lock), the tail read inside it, the
    inserts and `COMMIT`: worker processes on one state directory append to one chain. Writers
    queue on an `flock` of `audit.db.lock` first: SQLite's own busy wait polls with sleeps
    of up to 100 ms, so under load the writer that just committed takes the lock again and the
    others starve; a blocked flock is woken the moment the lock is released.
    `fsync`: FULL synchronous (each commit reaches the disk) or NORMAL (survives a process crash,
    not a power loss).
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
        self._extender = ChainExtender(
            signing_key, every_records=checkpoint_every_records, every_seconds=checkpoint_every_seconds
        )
        lock = path.with_name(path.name + ".lock")
        self._lock_fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE)
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
        # SQLite's automatic WAL checkpoint would run inside some unlucky COMMIT and stall every request
        # waiting on it; instead a second connection checkpoints passively beside the writer.
        self._conn.execute("PRAGMA wal_autocheckpoint=0")
        self._conn.executescript(SCHEMA)
        self._wal_conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._wal_conn.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
        self._wal_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bastion-audit-wal")
        self._wal_running: Future[Any] | None = None
        self._commits = 0

    def append(self, bodies: list[dict[str, Any]], now: float, *, final: bool = False) -> list[int]:
        conn = self._conn
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            return self._append(conn, bodies, now, final=final)
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _append(
        self, conn: sqlite3.Connection, bodies: list[dict[str, Any]], now: float, *, final: bool
    ) -> list[int]:
        conn.execute("BEGIN IMMEDIATE")  # the write lock first: the tail read below is the tail
        try:
            rows, checkpoints = self._extender.extend(self._tail(), bodies, now, final=final)
            if rows:
                conn.executemany("INSERT INTO records VALUES (?, ?, ?, ?)", rows)
            if checkpoints:
                conn.executemany("INSERT INTO checkpoints VALUES (?, ?, ?, ?)", checkpoints)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self._commits += 1
        if self._commits % _WAL_CHECKPOINT_EVERY == 0 and (
            self._wal_running is None or self._wal_running.done()
        ):
            self._wal_running = self._wal_executor.submit(
                self._wal_conn.execute, "PRAGMA wal_checkpoint(PASSIVE)"
            )
        return [row[0] for row in rows]

    def _tail(self) -> Tail:
        last = self._conn.execute("SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1").fetchone()
        cp = self._conn.execute("SELECT seq, signed_at FROM checkpoints ORDER BY seq DESC LIMIT 1").fetchone()
        return Tail(
            seq=last[0] if last else 0,
            hash=last[1] if last else GENESIS,
            checkpoint_seq=cp[0] if cp else 0,
            checkpoint_at=cp[1] if cp else 0.0,
        )

    def probe(self) -> bool:
        try:
            self._conn.execute("SELECT 1 FROM records LIMIT 1").fetchall()
        except sqlite3.Error:
            return False
        return True

    def close(self) -> None:
        self._wal_executor.shutdown()
        with contextlib.suppress(sqlite3.OperationalError):  # busy: another process's close truncates it
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
