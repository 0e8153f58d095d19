"""The audit writer: group commit over a sink, signed checkpoints, fail closed.

A request queues its record body (no encoding on the event loop: the sink links it). The
first record of a batch schedules one flush for the end of the current loop iteration; every
record that arrives before then joins it. The flush hands the whole batch to the sink on a
helper thread: one transaction that takes the sink's write lock, reads the chain's tail,
links and inserts the batch, adds any checkpoint due, and commits (the fsync, or the
round trip to PostgreSQL). While it runs, new records gather for the next batch; when it
ends, the waiting requests are answered with their sequence numbers. Numbers are given
inside the transaction, so several processes and replicas can append to one chain
(bastion.audit.sink, bastion.audit.postgres) and a failed transaction leaves no gap.

Failure: in "sync" durability the waiting requests fail closed with 503 `audit_unavailable`
and later records are refused at once. A SQLite failure (disk full) stops the log for good,
until an operator intervenes; a PostgreSQL failure (server down, connection cut) is probed
every `retry_seconds` and the log resumes when the database answers again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from bastion.audit.sink import AuditSink
from bastion.errors import BastionException

log = logging.getLogger("bastion.audit")

_Waiter = tuple[asyncio.Future[int], int]  # the future, and the body's index in its batch


class AuditUnavailable(BastionException):
    """The audit record could not be committed; in sync mode the request must fail closed."""


class AuditLog:
    def __init__(
        self,
        sink: AuditSink,
        *,
        flush_delay: float = 0.0,
        retry_seconds: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.sink = sink
        self._clock = clock
        self._bodies: list[dict[str, Any]] = []
        self._waiters: list[_Waiter] = []
        self._flush_scheduled = False
        # Nobody waits on a best-effort record, so its batch may gather for a few milliseconds.
        self._flush_delay = flush_delay
        self._retry_seconds = retry_seconds
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bastion-audit-commit")
        self._in_flight: Future[list[int]] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._probing = False
        self._written_since_checkpoint_timer = False
        self._stopped = False  # a failure the sink cannot recover from
        self.healthy = True

    def submit(self, body: dict[str, Any], *, wait: bool) -> asyncio.Future[int] | None:
        """Queue a record. With wait=True, return a future resolved with its sequence number once
        it is committed (or failed with AuditUnavailable).

        Raises AuditUnavailable at once while the log is unhealthy. Without a running event loop
        (shutdown, after the server's loop ended) only wait=False is possible: the record is
        queued and `close()` writes it.
        """
        if not self.healthy:
            raise AuditUnavailable("audit log is not writable")
        loop: asyncio.AbstractEventLoop | None = None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            if wait:
                raise
        self._bodies.append(body)
        if loop is None:
            return None
        if not self._flush_scheduled and self._in_flight is None:
            self._flush_scheduled = True
            if self._flush_delay and not wait:
                loop.call_later(self._flush_delay, self._flush)
            else:
                loop.call_soon(self._flush)
        if not wait:
            return None
        future: asyncio.Future[int] = loop.create_future()
        self._waiters.append((future, len(self._bodies) - 1))
        return future

    async def reachable(self) -> bool:
        """For readiness: healthy, and a sink that can fail and recover (PostgreSQL) answers now."""
        if not self.healthy:
            return False
        if not self.sink.recoverable:
            return True
        return await asyncio.wrap_future(self._executor.submit(self.sink.probe))

    def close(self) -> None:
        """Write what is pending and a final checkpoint, then close the sink."""
        if self._timer is not None:
            self._timer.cancel()
        if self._in_flight is not None:
            try:
                self._in_flight.result()  # let the commit under way finish; its waiters' loop is gone
            except Exception:
                self.healthy = False
        if self.healthy or (not self._stopped and self.sink.recoverable):
            bodies, self._bodies = self._bodies, []
            try:
                self._executor.submit(self.sink.append, bodies, self._clock(), final=True).result()
            except Exception as e:
                log.critical(
                    "audit log: the last %d records were not written: %s", len(bodies), type(e).__name__
                )
        self._executor.shutdown()
        self.sink.close()

    def _flush(self) -> None:
        """Start a group commit of everything pending, unless one is already under way."""
        self._flush_scheduled = False
        if self._in_flight is not None or not self._bodies:
            return  # the commit under way picks the pending records up when it ends
        bodies, self._bodies = self._bodies, []
        waiters, self._waiters = self._waiters, []
        self._start(bodies, waiters)

    def _start(
        self, bodies: list[dict[str, Any]], waiters: list[_Waiter], *, checkpoint: bool = False
    ) -> None:
        # The lock wait and the commit happen off the loop; requests keep flowing and queue up.
        self._in_flight = self._executor.submit(self.sink.append, bodies, self._clock(), final=checkpoint)
        done = asyncio.wrap_future(self._in_flight)
        done.add_done_callback(lambda f: self._end(waiters, len(bodies), f))

    def _end(self, waiters: list[_Waiter], count: int, done: asyncio.Future[list[int]]) -> None:
        self._in_flight = None
        error = done.exception()
        if error is not None:
            self._fail(error, waiters, count)
        else:
            seqs = done.result()
            for future, index in waiters:
                if not future.done():
                    future.set_result(seqs[index])
            if count:
                self._written_since_checkpoint_timer = True
            self._arm_checkpoint_timer()
        if self._bodies and not self._flush_scheduled:
            if self._flush_delay and not self._waiters:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_later(self._flush_delay, self._flush)
            else:
                self._flush()

    def _fail(self, error: BaseException, waiters: list[_Waiter], count: int) -> None:
        self.healthy = False
        recover = self.sink.recoverable
        log.critical(
            "audit log: a commit to %s failed (%s); %d records lost, refusing requests%s",
            self.sink.name,
            type(error).__name__,
            count,
            " until it answers again" if recover else " until an operator intervenes",
        )
        for future, _ in [*waiters, *self._waiters]:
            if not future.done():
                future.set_exception(AuditUnavailable(type(error).__name__))
        self._waiters = []
        self._bodies = []  # their requests were answered 503 (or, best effort, nobody waits)
        if not recover:
            self._stopped = True
            return
        self._probe_later()

    def _probe_later(self) -> None:
        if self._probing:
            return
        self._probing = True
        asyncio.get_running_loop().call_later(self._retry_seconds, self._probe)

    def _probe(self) -> None:
        def done(f: asyncio.Future[bool]) -> None:
            self._probing = False
            if not f.exception() and f.result():
                log.warning("audit log: %s answers again, accepting records", self.sink.name)
                self.healthy = True
            else:
                self._probe_later()

        asyncio.wrap_future(self._executor.submit(self.sink.probe)).add_done_callback(done)

    def _arm_checkpoint_timer(self) -> None:
        """Records past the last checkpoint get one within `checkpoint_every_seconds`, even when idle:
        that long after a write, a commit (with whatever is pending) signs one over the head."""
        if self._timer is not None or not self._written_since_checkpoint_timer:
            return
        self._timer = asyncio.get_running_loop().call_later(
            self.sink.checkpoint_every_seconds, self._on_timer
        )

    def _on_timer(self) -> None:
        self._timer = None
        self._written_since_checkpoint_timer = False
        if self._in_flight is not None or not self.healthy:
            return  # the commit under way re-arms the timer when it ends
        bodies, self._bodies = self._bodies, []
        waiters, self._waiters = self._waiters, []
        self._start(bodies, waiters, checkpoint=True)
