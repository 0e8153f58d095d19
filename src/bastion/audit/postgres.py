"""The audit chain in PostgreSQL: one chain for every worker and replica.

Design: one chain, appends serialised in the database. Each group commit is one
transaction, run on the `AuditLog`'s helper thread: it takes a transaction-scoped advisory lock
(`pg_advisory_xact_lock`, keyed by the table's name), reads the tail (last record, last
checkpoint), links the batch onto it, inserts it (one statement per table, the columns as
arrays) and commits, which releases the lock. Writers therefore take turns per
batch, not per record: under load a batch holds every request that arrived during the
previous commit, so throughput is (batches/s) × (batch size) and the lock costs one round trip
per batch. The primary key on `seq` backs the lock: a writer that somehow skipped it would
get a unique violation, never a fork.

Why not one chain per replica with cross-signed checkpoints: `verify` would need the list of
replicas that ever existed (a replica whose whole chain is dropped leaves no gap unless another
replica's signed checkpoint names it), export would have to merge chains with no total order,
and replicas come and go under an autoscaler. One chain keeps `bastion audit verify`, `export`,
the tamper rules and the "gapless from 1" property exactly as for SQLite.

Signing: every writer signs checkpoints with the deployment's audit signing key (one file,
mounted on every replica: `[audit] signing_key`). The public key is registered in
`<table>_signer` by the first writer; a writer holding another key refuses to start, so a
replica that generated its own key cannot write checkpoints `verify` would reject. The
registration is a guard for operators, not a trust anchor: `verify` uses the public key file
it is given, never the table's copy.

Failures: a commit that fails (server down, connection cut) raises; the `AuditLog` answers its
waiters 503 `audit_unavailable`, refuses records while it probes, and resumes once `probe`
reconnects. Nothing of a failed transaction is in the chain, so no gap is left.

A server that accepts bytes but never answers (a hung primary, a black-holed path behind a proxy)
fires none of the server-side or kernel bounds. So the `AuditLog` waits for a step at most
`deadline` seconds, answers its waiters 503, and calls `interrupt`: the connection's socket is shut
down (the helper thread's wait returns with an error and the connection is dropped, so later
transactions get a new one); the server ends the session with its own bounds. Such a batch's
outcome is unknown (the server may still commit it); it is never sent again, and every transaction
reads the head inside its lock, so a batch committed late is in the chain once, before the next.
Its requests were answered 503: an extra record, never a missing one.
"""

from __future__ import annotations

import contextlib
import re
import socket
from typing import Any

import psycopg
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bastion.audit.chain import GENESIS, ChainExtender, Checkpoint, Row, Tail
from bastion.audit.sink import AuditSink
from bastion.errors import ConfigError

TABLE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,47}$")  # + "_checkpoints" stays within PostgreSQL's 63


def connect_kwargs(timeout: float, *, bound_statements: bool = True) -> dict[str, Any]:
    """libpq parameters: `timeout` seconds to connect and for the network to answer; with
    `bound_statements`, for each statement too (a writer's lock wait behind a stuck writer)."""
    # A server that vanishes without a reset (a cut network) must not hold a request forever:
    # TCP keepalives and a user timeout end the connection within seconds.
    kwargs: dict[str, Any] = {
        "connect_timeout": max(1, int(timeout)),
        "keepalives": 1,
        "keepalives_idle": 5,
        "keepalives_interval": 2,
        "keepalives_count": 2,
        "tcp_user_timeout": int(timeout * 1000),
    }
    if bound_statements:
        # A session left behind mid-transaction (the client gave up on a frozen path) must not hold
        # the chain's lock from the other writers for longer than a few deadlines.
        kwargs["options"] = (
            f"-c statement_timeout={int(timeout * 1000)} "
            f"-c idle_in_transaction_session_timeout={int(timeout * 2000)}"
        )
    return kwargs


class PostgresSink(AuditSink):
    """The audit chain in `table` (records) and `table`_checkpoints, shared by every writer.

    `timeout` (seconds): connection, statement and lock-wait bound. `fsync` false sets
    `synchronous_commit = off` (a commit acknowledged before PostgreSQL's WAL flush: survives a
    Bastion crash, not a PostgreSQL crash); true keeps the server's setting.
    Raises ConfigError for a bad table name or a table signed with another key.
    """

    recoverable = True
    stage_on_loop = False  # its lock and commit are round trips: the whole transaction off the loop

    def __init__(
        self,
        dsn: str,
        signing_key: Ed25519PrivateKey,
        *,
        table: str = "bastion_audit",
        checkpoint_every_records: int = 1000,
        checkpoint_every_seconds: float = 60.0,
        fsync: bool = True,
        timeout: float = 5.0,
    ) -> None:
        if not TABLE_NAME.match(table):
            raise ConfigError(
                f"audit table name {table!r}: lower-case letters, digits and _ only, 48 at most"
            )
        self.name = f"postgresql table {table}"
        self.table = table
        self.checkpoint_every_seconds = checkpoint_every_seconds
        self._dsn, self._timeout, self._fsync = dsn, timeout, fsync
        self.deadline = timeout
        self._public = (
            signing_key.public_key()
            .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            .hex()
        )
        self._extender = ChainExtender(
            signing_key, every_records=checkpoint_every_records, every_seconds=checkpoint_every_seconds
        )
        self._lock_key = f"bastion-audit:{table}"
        self._conn: psycopg.Connection[Any] | None = None
        self._staged: tuple[list[Row], list[Checkpoint]] = ([], [])
        with contextlib.suppress(psycopg.OperationalError):
            self._connection()  # unreachable: the server starts not ready and connects when it can

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        conn = psycopg.connect(self._dsn, **connect_kwargs(self._timeout))
        try:
            with conn.transaction():
                # CREATE TABLE IF NOT EXISTS races with itself when replicas start together.
                conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self._lock_key,))
                t = self.table
                conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {t} (seq bigint PRIMARY KEY, body text NOT NULL, "
                    "prev_hash text NOT NULL, hash text NOT NULL)"
                )
                conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {t}_checkpoints (seq bigint PRIMARY KEY, hash text NOT NULL, "
                    "signed_at double precision NOT NULL, signature text NOT NULL)"
                )
                conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {t}_signer (id int PRIMARY KEY CHECK (id = 1), "
                    "public_key text NOT NULL)"
                )
                conn.execute(f"INSERT INTO {t}_signer VALUES (1, %s) ON CONFLICT DO NOTHING", (self._public,))
                row = conn.execute(f"SELECT public_key FROM {t}_signer").fetchone()
            if row is None or row[0] != self._public:
                raise ConfigError(
                    f"{self.name}: its checkpoints are signed with another audit key; give every "
                    "replica the same [audit] signing_key"
                )
            if not self._fsync:
                conn.execute("SET synchronous_commit = off")
                conn.commit()
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def begin(self) -> Tail:
        try:
            conn = self._connection()
            # The first statement opens the transaction; the lock is held until COMMIT or ROLLBACK.
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self._lock_key,))
            return self._tail(conn)
        except psycopg.Error:
            self._drop()
            raise

    def stage(
        self, tail: Tail, bodies: list[dict[str, Any]], now: float, *, final: bool = False
    ) -> list[int]:
        # No I/O here (it runs on the event loop): the rows go to the server with the COMMIT.
        self._staged = self._extender.extend(tail, bodies, now, final=final)
        return [row[0] for row in self._staged[0]]

    def commit(self) -> None:
        rows, checkpoints = self._staged
        self._staged = ([], [])
        try:
            conn = self._connection_in_transaction()
            self._insert(conn, rows, checkpoints)
            conn.commit()
        except psycopg.Error:
            self._drop()
            raise

    def abort(self) -> None:
        self._staged = ([], [])
        self._drop()  # closing the connection rolls back and releases the lock, without a round trip

    def _connection_in_transaction(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            raise psycopg.OperationalError("the connection was lost during the transaction")
        return self._conn

    def _tail(self, conn: psycopg.Connection[Any]) -> Tail:
        t = self.table
        row = conn.execute(
            f"SELECT r.seq, r.hash, c.seq, c.signed_at FROM "
            f"(SELECT 1) one LEFT JOIN (SELECT seq, hash FROM {t} ORDER BY seq DESC LIMIT 1) r ON true "
            f"LEFT JOIN (SELECT seq, signed_at FROM {t}_checkpoints ORDER BY seq DESC LIMIT 1) c ON true"
        ).fetchone()
        assert row is not None
        return Tail(
            seq=row[0] or 0,
            hash=row[1] or GENESIS,
            checkpoint_seq=row[2] or 0,
            checkpoint_at=row[3] or 0.0,
        )

    def _insert(self, conn: psycopg.Connection[Any], rows: list[Row], checkpoints: list[Checkpoint]) -> None:
        # One statement a table, the columns as arrays: one round trip whatever the batch size. Binary
        # (%b): psycopg escapes a text array's every quote with a regex, 4x the CPU of the whole write.
        if rows:
            conn.execute(
                f"INSERT INTO {self.table} SELECT * FROM unnest(%b::bigint[], %b::text[], %b::text[], %b::text[])",
                [list(column) for column in zip(*rows, strict=True)],
            )
        if checkpoints:
            conn.execute(
                f"INSERT INTO {self.table}_checkpoints SELECT * FROM "
                "unnest(%b::bigint[], %b::text[], %b::double precision[], %b::text[])",
                [list(column) for column in zip(*checkpoints, strict=True)],
            )

    def probe(self) -> bool:
        try:
            conn = self._connection()
            conn.execute("SELECT 1")
            conn.commit()
        except psycopg.Error:
            self._drop()
            return False
        return True

    def interrupt(self) -> None:
        conn = self._conn  # the connection the helper thread is blocked on (read once: it may drop it)
        if conn is None or conn.closed:
            return
        # No cancel request: psycopg's blocking PQcancel holds the GIL (measured: it froze the event
        # loop with the path), and through a frozen path it would not arrive anyway. The server ends
        # the session itself: statement_timeout, idle_in_transaction_session_timeout, or the closed
        # socket once the path passes bytes again.
        # shutdown() wakes the thread waiting on the socket (its read sees EOF, psycopg raises and the
        # thread drops the connection); close() here would free libpq's state under its feet.
        # fromfd duplicates the descriptor: closing the duplicate leaves libpq's own intact.
        with (
            contextlib.suppress(OSError, psycopg.Error),
            socket.fromfd(conn.pgconn.socket, socket.AF_INET, socket.SOCK_STREAM) as sock,
        ):
            sock.shutdown(socket.SHUT_RDWR)

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None

    def close(self) -> None:
        self._drop()


def read_postgres(dsn: str, table: str) -> tuple[list[Row], list[tuple[int, str, str]]]:
    """Every record and checkpoint of an audit table, in `seq` order, for `verify` and `export`.

    Raises psycopg.Error when the server or the table cannot be read."""
    if not TABLE_NAME.match(table):
        raise ConfigError(f"audit table name {table!r}: lower-case letters, digits and _ only, 48 at most")
    with psycopg.connect(dsn, **connect_kwargs(30.0, bound_statements=False)) as conn:  # a long log
        # One snapshot for both reads: writers may be appending while an operator verifies.
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        rows = conn.execute(f"SELECT seq, body, prev_hash, hash FROM {table} ORDER BY seq").fetchall()
        checkpoints = conn.execute(
            f"SELECT seq, hash, signature FROM {table}_checkpoints ORDER BY seq"
        ).fetchall()
    return rows, checkpoints
