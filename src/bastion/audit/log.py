"""The audit writer: group commit over a sink, signed checkpoints, fail closed.

A request queues its record body. The first record of a batch schedules one flush for the
end of the current loop iteration; every record that arrives before then joins it. A flush
writes the whole batch as one transaction of the sink (bastion.audit.sink):

- the write lock and the chain's tail: on the loop when free at once (one process on a
  SQLite file), else on a helper thread that waits for it (another worker is writing);
- linking the batch onto the tail (sequence numbers, canonical JSON, SHA-256, checkpoint
  signatures) and SQLite's inserts: on the loop, a few microseconds a record;
- COMMIT (the fsync, or PostgreSQL's round trip): on the helper thread, while new records
  gather for the next batch. When it ends, the waiting requests are answered.

A PostgreSQL sink runs the whole transaction on the helper thread instead (its lock and
commit are network round trips; its Python work is a few C calls, no per-row hand-offs).
Measured here: a helper thread doing per-row Python work slowed every stage of the request
path 3-4x through GIL hand-offs; a thread that only waits does not.

Numbers are given inside the transaction, so several processes and replicas can append to
one chain and a failed transaction leaves no gap.

Failure: in "sync" durability the waiting requests fail closed with 503 `audit_unavailable`
and later records are refused at once. A SQLite failure (disk full) stops the log for good,
until an operator intervenes; a PostgreSQL failure (server down, connection cut) is probed
every `retry_seconds` and the log resumes when the database answers again.

Deadline: a sink with a `deadline` (PostgreSQL) gets at most that long for each step on the helper
thread. Past it the batch's requests are answered 503 and the log marks itself down, the sink is
interrupted (its connection abandoned, a new one next) and a late outcome of that step is ignored:
a database that accepts bytes and never answers fails closed within the deadline instead of holding
every request. Readiness waits at most `READY_DEADLINE` for its probe.

A bounded lock wait: another process holding the write lock (a SQLite sink's flock; a worker
stopped or hung mid-transaction) is waited for at most `lock_wait_seconds` (LOCK_WAIT_SECONDS).
Past it, the batch's requests and every later one fail closed with `audit_unavailable` at once
while the helper thread goes on waiting in the kernel (a blocked flock is woken fairly, the moment
the lock is let go); when it gets the lock (the holder resumed, or died and the kernel dropped
its flock) it lets it go unused and the log accepts records again. Nothing abandoned is written.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from bastion.audit.chain import Tail
from bastion.audit.sink import AuditSink
from bastion.errors import BastionException

log = logging.getLogger("bastion.audit")

READY_DEADLINE = 1.0  # seconds readiness waits for the sink's probe before it answers "not ready"

LOCK_WAIT_SECONDS = 1.5  # the longest a batch waits for another process's write lock

_Waiter = tuple[asyncio.Future[int], int]  # the future, and the body's index in its batch


class AuditUnavailable(BastionException):
    """The audit record could not be committed; in sync mode the request must fail closed."""


@dataclass(slots=True)
class _Batch:
    bodies: list[dict[str, Any]]
    waiters: list[_Waiter]
    checkpoint: bool  # sign one over the head whatever the counts (the idle timer)
    now: float
    step: str = "begin"  # what the helper thread is doing for it: "begin", "commit" or "append"
    seqs: list[int] | None = None
    overdue: bool = False  # its step passed the sink's deadline: answered 503, a late outcome ignored
    abandoned: bool = False  # its lock wait ran past the bound: its requests were answered 503


class AuditLog:
    def __init__(
        self,
        sink: AuditSink,
        *,
        flush_delay: float = 0.0,
        retry_seconds: float = 1.0,
        lock_wait_seconds: float = LOCK_WAIT_SECONDS,
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
        self._lock_wait_seconds = lock_wait_seconds
        self._lock_timer: asyncio.TimerHandle | None = None
        self.stalled = False  # a lock wait ran past the bound and goes on: records are refused
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bastion-audit-commit")
        self._batch: _Batch | None = None  # the batch being written
        self._step: Future[Any] | None = None  # its step on the helper thread
        self._timer: asyncio.TimerHandle | None = None
        self._probing = False
        self._ready_probe: Future[bool] | None = None  # shared by concurrent readiness checks
        self._written_since_timer = False
        self._stopped = False  # a failure the sink cannot recover from
        self._closed = False
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
        if self.stalled:
            raise AuditUnavailable("audit write lock held by another process")
        loop: asyncio.AbstractEventLoop | None = None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            if wait:
                raise
        self._bodies.append(body)
        if loop is None:
            return None
        if not self._flush_scheduled and self._batch is None:
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
        # At most READY_DEADLINE: a probe queued behind a hung commit, or hung itself, says "not ready"
        # now; one probe at a time however often readiness is asked.
        if self._ready_probe is None or self._ready_probe.done():
            self._ready_probe = self._executor.submit(self.sink.probe)
            self._watch(self._ready_probe)
        try:
            probe = asyncio.shield(asyncio.wrap_future(self._ready_probe))
            return await asyncio.wait_for(probe, READY_DEADLINE)
        except TimeoutError:
            return False

    def close(self) -> None:
        """Finish the batch under way, write what is pending and a final checkpoint, close the sink."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        batch, step = self._batch, self._step
        if batch is not None and step is not None:
            try:  # its waiters' loop may be gone: finish it here
                result = self._result(step)
                if batch.abandoned:
                    self.sink.abort()  # its requests were answered 503: nothing of it is written
                elif batch.step == "begin":
                    self.sink.stage(result, batch.bodies, batch.now, final=batch.checkpoint)
                    self.sink.commit()
            except Exception:
                self.sink.abort()
                self.healthy = False
        if self.healthy or (not self._stopped and self.sink.recoverable):
            bodies, self._bodies = self._bodies, []
            try:
                self._result(self._executor.submit(self.sink.append, bodies, self._clock(), final=True))
            except Exception as e:
                log.critical(
                    "audit log: the last %d records were not written: %s", len(bodies), type(e).__name__
                )
        self._executor.shutdown()
        self.sink.close()

    def _result(self, step: Future[Any]) -> Any:
        """The step's result, waited for at most the sink's deadline (then interrupted: TimeoutError)."""
        try:
            return step.result(timeout=self.sink.deadline)
        except TimeoutError:
            step.cancel()
            self.sink.interrupt()
            raise

    def _flush(self) -> None:
        """Start a group commit of everything pending, unless one is already under way."""
        self._flush_scheduled = False
        if self._batch is not None or not self._bodies:
            return  # the commit under way picks the pending records up when it ends
        self._start(checkpoint=False)

    def _start(self, *, checkpoint: bool) -> None:
        batch = _Batch(self._bodies, self._waiters, checkpoint, self._clock())
        self._bodies, self._waiters = [], []
        self._batch = batch
        try:
            tail = self.sink.try_begin()
        except Exception as e:
            self._end(batch, e)
            return
        if tail is not None:
            self._stage(batch, tail)
        elif not self.sink.stage_on_loop:  # a network store: the whole transaction on the helper thread
            batch.step = "append"
            self._on_thread(batch, self.sink.append, batch.bodies, batch.now, final=batch.checkpoint)
        else:  # another process holds the lock: wait for it off the loop, for a bounded time
            self._on_thread(batch, self.sink.begin)
            self._lock_timer = asyncio.get_running_loop().call_later(
                self._lock_wait_seconds, self._lock_wait_over, batch
            )

    def _lock_wait_over(self, batch: _Batch) -> None:
        """The bound passed with `batch` still waiting for the lock: answer its requests and the
        pending ones 503 and refuse new ones until the wait (left running) ends."""
        self._lock_timer = None
        if self._batch is not batch or batch.step != "begin" or self._closed:
            return
        batch.abandoned = True
        self.stalled = True
        log.error(
            "audit log: the write lock of %s was held by another process for over %.1f s; "
            "refusing requests until it is let go",
            self.sink.name,
            self._lock_wait_seconds,
        )
        for future, _ in [*batch.waiters, *self._waiters]:
            if not future.done():
                future.set_exception(AuditUnavailable("audit write lock wait timed out"))
        self._waiters = []
        self._bodies = []  # their requests were answered 503 (or, best effort, nobody waits)

    def _on_thread(self, batch: _Batch, call: Callable[..., Any], *args: Any, **kw: Any) -> None:
        step = self._executor.submit(call, *args, **kw)
        self._step = step
        asyncio.wrap_future(step).add_done_callback(lambda f: self._stepped(batch, step, f))
        self._watch(step, batch)

    def _watch(self, step: Future[Any], batch: _Batch | None = None) -> None:
        """Past the sink's deadline, a step not done yet is given up (and its batch answered 503)."""
        if self.sink.deadline is not None:
            asyncio.get_running_loop().call_later(self.sink.deadline, self._overdue, step, batch)

    def _overdue(self, step: Future[Any], batch: _Batch | None) -> None:
        if step.done():
            return
        step.cancel()  # still queued behind a hung step: it never runs
        self.sink.interrupt()  # the hung step raises soon and leaves its connection behind
        if batch is None or batch.overdue or self._closed or self._batch is not batch:
            return  # a probe (its caller stopped waiting, or it reports a failure), or already ended
        # Unknown outcome: the server may yet commit it. It is not sent again; its requests get 503.
        batch.overdue = True
        self._end(batch, TimeoutError(f"no answer within {self.sink.deadline} s"))

    def _stepped(self, batch: _Batch, step: Future[Any], done: asyncio.Future[Any]) -> None:
        if self._step is step:
            self._step = None
        if self._closed or batch.overdue:
            if not done.cancelled():
                done.exception()  # retrieved: a late failure of an answered batch is expected
            return  # close() finished the batch, or it passed the deadline and was answered 503
        if self._lock_timer is not None:
            self._lock_timer.cancel()
            self._lock_timer = None
        error = done.exception()
        if batch.abandoned:  # the lock came after the bound: let it go unused, accept records again
            if error is None:
                self.sink.abort()
            self.stalled = False
            self._batch = None
            log.warning("audit log: the write lock of %s is free again, accepting records", self.sink.name)
            return
        if error is not None:
            self._end(batch, error)
        elif batch.step == "begin":
            self._stage(batch, done.result())
        elif batch.step == "append":
            batch.seqs = done.result()
            self._end(batch, None)
        else:
            self._end(batch, None)

    def _stage(self, batch: _Batch, tail: Tail) -> None:
        """On the loop: link and insert, then commit (inline, or on the helper thread)."""
        try:
            batch.seqs = self.sink.stage(tail, batch.bodies, batch.now, final=batch.checkpoint)
            if self.sink.inline_commit:
                self.sink.commit()
        except Exception as e:
            self.sink.abort()
            self._end(batch, e)
            return
        if self.sink.inline_commit:
            self._end(batch, None)
            return
        batch.step = "commit"
        self._on_thread(batch, self.sink.commit)

    def _end(self, batch: _Batch, error: BaseException | None) -> None:
        self._batch = None
        if error is not None:
            self._fail(error, batch)
        else:
            assert batch.seqs is not None
            for future, index in batch.waiters:
                if not future.done():
                    future.set_result(batch.seqs[index])
            if batch.bodies:
                self._written_since_timer = True
            self._arm_checkpoint_timer()
        if self._bodies and not self._flush_scheduled and self.healthy:
            if self._flush_delay and not self._waiters:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_later(self._flush_delay, self._flush)
            else:
                self._flush()

    def _fail(self, error: BaseException, batch: _Batch) -> None:
        self.healthy = False
        recover = self.sink.recoverable
        log.critical(
            "audit log: a commit to %s failed (%s); %d records lost, refusing requests%s",
            self.sink.name,
            type(error).__name__,
            len(batch.bodies),
            " until it answers again" if recover else " until an operator intervenes",
        )
        for future, _ in [*batch.waiters, *self._waiters]:
            if not future.done():
                future.set_exception(AuditUnavailable(type(error).__name__))
        self._waiters = []
        self._bodies = []  # their requests were answered 503 (or, best effort, nobody waits)
        if not recover:
            self._stopped = True
            return
        self._probe_later()

    def _probe_later(self) -> None:
        if self._probing or self._closed:
            return
        self._probing = True
        asyncio.get_running_loop().call_later(self._retry_seconds, self._probe)

    def _probe(self) -> None:
        def done(f: asyncio.Future[bool]) -> None:
            self._probing = False
            if not f.cancelled() and not f.exception() and f.result():
                log.warning("audit log: %s answers again, accepting records", self.sink.name)
                self.healthy = True
            else:
                self._probe_later()

        if self._closed:
            self._probing = False
            return
        probe = self._executor.submit(self.sink.probe)
        self._watch(probe)
        asyncio.wrap_future(probe).add_done_callback(done)

    def _arm_checkpoint_timer(self) -> None:
        """Records past the last checkpoint get one within `checkpoint_every_seconds`, even when idle:
        that long after a write, a commit (with whatever is pending) signs one over the head."""
        if self._timer is not None or not self._written_since_timer:
            return
        self._timer = asyncio.get_running_loop().call_later(
            self.sink.checkpoint_every_seconds, self._on_timer
        )

    def _on_timer(self) -> None:
        self._timer = None
        self._written_since_timer = False
        if self._batch is not None or not self.healthy:
            return  # the commit under way re-arms the timer when it ends
        self._start(checkpoint=True)
