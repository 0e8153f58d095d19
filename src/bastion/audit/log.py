"""The audit writer: one thread, group commit, signed checkpoints.

Requests hand records to a queue; the writer thread takes everything queued,
chains it, inserts it in one transaction and commits with a single fsync
(synchronous=FULL), then wakes every waiting request at once. Under load a
batch holds hundreds of records, so the request path pays a share of one fsync,
not one each. In "sync" durability a response waits for its record's commit.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bastion.audit.chain import GENESIS, SCHEMA, chain_hash, checkpoint_message, encode_body

log = logging.getLogger("bastion.audit")

_Waiter = tuple[asyncio.AbstractEventLoop, "asyncio.Future[int]"] | None
_STOP = object()


class AuditUnavailable(Exception):
    """The audit record could not be committed; in sync mode the request must fail closed."""


class AuditLog:
    def __init__(
        self,
        path: Path,
        signing_key: Ed25519PrivateKey,
        *,
        checkpoint_every_records: int = 1000,
        checkpoint_every_seconds: float = 60.0,
        max_batch: int = 512,
        clock: Callable[[], float] = time.time,
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._key = signing_key
        self._every_records = checkpoint_every_records
        self._every_seconds = checkpoint_every_seconds
        self._max_batch = max_batch
        self._clock = clock
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(SCHEMA)
        row = self._conn.execute("SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1").fetchone()
        self._seq: int = row[0] if row else 0
        self._head: str = row[1] if row else GENESIS
        cp = self._conn.execute("SELECT seq FROM checkpoints ORDER BY seq DESC LIMIT 1").fetchone()
        self._checkpointed_seq = cp[0] if cp else 0
        self._last_checkpoint_at = self._clock()
        self._thread = threading.Thread(target=self._run, name="bastion-audit-writer", daemon=True)
        self.healthy = True
        self._thread.start()

    # -- request side -------------------------------------------------------------------------

    def submit(self, body: dict[str, Any], *, wait: bool) -> asyncio.Future[int] | None:
        """Queue a record. With wait=True, return a future resolved with its seq once committed."""
        if not self.healthy:
            raise AuditUnavailable("audit writer is not running")
        if not wait:
            self._queue.put((body, None))
            return None
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        self._queue.put((body, (loop, future)))
        return future

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout=30)
        self._conn.close()

    # -- writer thread ------------------------------------------------------------------------

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch: list[tuple[dict[str, Any], _Waiter]] = []
            try:
                first = self._queue.get(timeout=min(self._every_seconds, 1.0))
            except queue.Empty:
                first = None
            if first is _STOP:
                stopping = True
            elif first is not None:
                batch.append(first)
            while len(batch) < self._max_batch and not stopping:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                else:
                    batch.append(item)
            try:
                self._write(batch, final=stopping)
            except Exception as e:  # disk full, database locked too long: fail closed, loudly
                self.healthy = False
                log.critical("audit writer failed, refusing further requests: %s", type(e).__name__)
                self._settle(batch, error=e)
                return
            self._settle(batch, error=None)

    def _write(self, batch: list[tuple[dict[str, Any], _Waiter]], *, final: bool) -> None:
        now = self._clock()
        seq, head, last_cp = self._seq, self._head, self._checkpointed_seq
        rows, checkpoints = [], []
        for body, _ in batch:
            seq += 1
            body["seq"] = seq
            encoded = encode_body(body)
            new_head = chain_hash(head, encoded)
            rows.append((seq, encoded.decode(), head, new_head))
            head = new_head
            if seq - last_cp >= self._every_records:  # at most N records between checkpoints
                checkpoints.append(self._checkpoint(seq, head, now))
                last_cp = seq
        if seq > last_cp and (final or now - self._last_checkpoint_at >= self._every_seconds):
            checkpoints.append(self._checkpoint(seq, head, now))
            last_cp = seq
        if not rows and not checkpoints:
            return
        self._conn.execute("BEGIN")
        try:
            self._conn.executemany("INSERT INTO records VALUES (?, ?, ?, ?)", rows)
            self._conn.executemany("INSERT INTO checkpoints VALUES (?, ?, ?, ?)", checkpoints)
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._seq, self._head = seq, head
        if checkpoints:
            self._checkpointed_seq, self._last_checkpoint_at = last_cp, now

    def _checkpoint(self, seq: int, head: str, now: float) -> tuple[int, str, float, str]:
        return (seq, head, now, self._key.sign(checkpoint_message(seq, head)).hex())

    @staticmethod
    def _settle(batch: list[tuple[dict[str, Any], _Waiter]], *, error: Exception | None) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[int], int]]] = {}
        for body, waiter in batch:
            if waiter is not None:
                loop, future = waiter
                by_loop.setdefault(loop, []).append((future, body.get("seq", 0)))
        for loop, items in by_loop.items():
            # One wake-up per batch per event loop, not one per record.
            loop.call_soon_threadsafe(_resolve, items, error)


def _resolve(items: list[tuple[asyncio.Future[int], int]], error: Exception | None) -> None:
    for future, seq in items:
        if future.done():
            continue
        if error is None:
            future.set_result(seq)
        else:
            future.set_exception(AuditUnavailable(type(error).__name__))
