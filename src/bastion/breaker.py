"""A deadline on every runtime call, and a circuit breaker per model version.

A Python thread cannot be killed, so a runtime call runs in a small thread pool of the model's own
(`inference_threads` threads) while the request waits on the event loop. The deadline
(`inference_timeout_seconds`) counts from the moment a thread starts the runtime call: the model is
judged by its own time, never by the wait for a thread, which is load and not the model's fault. At
the deadline the request is answered 504 `inference_timeout` and the call is asked to stop: an
ONNX call is stopped for real (onnxruntime's `RunOptions.terminate`, checked between the graph's
nodes, loop iterations included); a call that cannot be stopped (a
scikit-learn estimator) keeps its thread until it returns, and is counted as stuck. A model's stuck
calls are bounded by its pool, and an open breaker is not probed while every thread is stuck.

The wait for a thread is bounded instead: at most `inference_queue` calls wait beyond the threads
(one principal's calls, running or waiting, at most `inference_threads` +
`inference_queue_per_principal`), and a call waits at most `inference_queue_seconds` before a
thread takes it. Beyond either bound the request is refused 503 `model_overloaded` with
Retry-After, the runtime not called and the breaker not told: overload is not a failure. A place
is freed when its call ends, or, for a call whose caller gave up, when a thread drops it off the
queue, so the queue's memory is bounded even while every thread is stuck.

The breaker counts only the server's own failures: a runtime that raised (500) or missed its
deadline (504). A client's bad input is refused (4xx) before the runtime is called and never reaches
it. `breaker_failures` failures in a row (no success between them) within `breaker_window_seconds`
open it: every request to that version is refused 503 `model_circuit_open` with Retry-After and the
runtime is not called. After `breaker_open_seconds` it is half-open: `breaker_half_open_probes`
requests go through; when all of them succeed it closes, any failure opens it again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

from bastion.errors import ErrorCode, InferenceTimeout, ModelCircuitOpen, ModelFailed, ModelOverloaded

log = logging.getLogger("bastion.breaker")

T = TypeVar("T")


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


# The gauge's value per state (bastion_model_breaker_state).
STATE_VALUE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """Per model (the `[[models]]` entry's fields of the same names). Seconds; counts of calls."""

    inference_timeout: float = 10.0
    threads: int = 1
    failures: int = 5
    window: float = 60.0
    open_seconds: float = 30.0
    half_open_probes: int = 1
    queue: int = 256  # calls that may wait beyond the threads
    queue_seconds: float = 5.0  # the longest a call waits for a thread
    queue_per_principal: int = 128  # one principal's calls beyond the threads, running or waiting
    inline: bool = False  # inference_isolation = "inline": on the event loop, stopped by the watchdog


@dataclass(frozen=True, slots=True)
class Transition:
    """A change of a breaker's state, for the audit log and the metrics."""

    previous: BreakerState
    state: BreakerState
    reason: str  # failures | probe_failed | open_elapsed | probes_succeeded
    detail: str


class CircuitBreaker:
    """The state machine alone (no threads, no I/O): closed -> open -> half-open -> closed | open.

    `admit()` asks to call the model: it returns a permit, or raises `ModelCircuitOpen` (with the
    seconds until a retry may succeed). Each admitted call ends with exactly one `succeeded(permit)`
    or `failed(permit)`. A result is counted only in the state it was admitted in: a slow call let
    through while closed that fails after the breaker opened says nothing about the half-open probes.
    `clock` is monotonic seconds (injected: tests step it); `on_transition` sees every state change.
    """

    def __init__(
        self,
        policy: BreakerPolicy,
        *,
        clock: Callable[[], float],
        on_transition: Callable[[Transition], None] = lambda t: None,
    ) -> None:
        self.policy = policy
        self._clock = clock
        self._on_transition = on_transition
        self._lock = threading.Lock()  # results arrive from worker threads' callbacks too
        self.state = BreakerState.CLOSED
        self._epoch = 0  # bumped on every transition; a permit is the epoch it was given in
        self._failures: list[float] = []  # times of the failures in a row, oldest first
        self._opened_at = 0.0
        self._probes_out = 0  # half-open: probes admitted, result pending
        self._probes_ok = 0

    def admit(self, *, can_probe: bool = True) -> int:
        """A permit to call the model, or `ModelCircuitOpen`. `can_probe`: the model has a free
        thread (while every thread is stuck, an open breaker stays open)."""
        transition = None
        with self._lock:
            now = self._clock()
            if self.state is BreakerState.OPEN:
                left = self._opened_at + self.policy.open_seconds - now
                if left > 0 or not can_probe:
                    raise ModelCircuitOpen(max(left, 1.0))
                transition = self._move(BreakerState.HALF_OPEN, "open_elapsed", "probing")
            if self.state is BreakerState.HALF_OPEN:
                if self._probes_out + self._probes_ok >= self.policy.half_open_probes:
                    # Enough probes in flight: the rest wait for their verdict.
                    raise ModelCircuitOpen(1.0)
                self._probes_out += 1
            permit = self._epoch
        if transition is not None:
            self._on_transition(transition)
        return permit

    def succeeded(self, permit: int) -> None:
        transition = None
        with self._lock:
            if permit != self._epoch:
                return
            if self.state is BreakerState.CLOSED:
                self._failures.clear()
            elif self.state is BreakerState.HALF_OPEN:
                self._probes_out -= 1
                self._probes_ok += 1
                if self._probes_ok >= self.policy.half_open_probes:
                    transition = self._move(
                        BreakerState.CLOSED, "probes_succeeded", f"{self._probes_ok} probes succeeded"
                    )
        if transition is not None:
            self._on_transition(transition)

    def failed(self, permit: int, why: str) -> None:
        """`why`: the failure's stable code (inference_failed | inference_timeout), for the detail."""
        transition = None
        with self._lock:
            if permit != self._epoch:
                return
            now = self._clock()
            if self.state is BreakerState.HALF_OPEN:
                transition = self._move(BreakerState.OPEN, "probe_failed", f"a probe failed: {why}")
            elif self.state is BreakerState.CLOSED:
                horizon = now - self.policy.window
                self._failures = [t for t in self._failures if t > horizon]
                self._failures.append(now)
                if len(self._failures) >= self.policy.failures:
                    transition = self._move(
                        BreakerState.OPEN,
                        "failures",
                        f"{len(self._failures)} failures in a row within {self.policy.window:g} s, "
                        f"the last: {why}",
                    )
        if transition is not None:
            self._on_transition(transition)

    def abandoned(self, permit: int) -> None:
        """An admitted call ended without a verdict (the request was cancelled): its probe slot is freed."""
        with self._lock:
            if permit == self._epoch and self.state is BreakerState.HALF_OPEN:
                self._probes_out -= 1

    def open_for(self) -> float | None:
        """Seconds until an open breaker lets a probe through (0 once due); None unless open."""
        with self._lock:
            if self.state is not BreakerState.OPEN:
                return None
            return max(self._opened_at + self.policy.open_seconds - self._clock(), 0.0)

    def _move(self, state: BreakerState, reason: str, detail: str) -> Transition:
        """Under the lock."""
        transition = Transition(self.state, state, reason, detail)
        self.state = state
        self._epoch += 1
        self._failures.clear()
        self._probes_out = self._probes_ok = 0
        if state is BreakerState.OPEN:
            self._opened_at = self._clock()
        return transition


class Cancel:
    """How a runtime lets another thread stop one of its calls (onnxruntime: `RunOptions.terminate`).
    A runtime whose calls cannot be stopped offers none."""

    def __init__(self, stop: Callable[[], None]) -> None:
        self.stop = stop


class _Call(concurrent.futures.Future[T]):
    """A runtime call's future; `started` (monotonic seconds) is set by the thread that takes it,
    before it becomes running, so a caller that cannot cancel it always finds the start time."""

    started: float | None = None


# Retry-After of a refusal for load: a place frees as soon as one call ends.
OVERLOADED_RETRY_AFTER = 1.0


class _Pool:
    """A fixed set of daemon threads taking calls from one bounded queue. Not `ThreadPoolExecutor`:
    its threads are joined when the interpreter exits, so one stuck call would hang the shutdown;
    and its queue is unbounded.

    `held`: calls queued or on a thread (stuck ones included), at most `threads + queue`; one
    owner's at most `threads + per_owner`. `submit` beyond raises `ModelOverloaded`."""

    def __init__(self, threads: int, name: str, queue_places: int, per_owner: int) -> None:
        self._threads = threads
        self._name = name
        self._capacity = threads + queue_places
        self._per_owner = threads + per_owner
        self._lock = threading.Lock()  # the counts change on the loop (submit) and the threads (release)
        self.held = 0
        self._held_by: dict[str, int] = {}
        self._queue: queue.SimpleQueue[tuple[_Call[Any], Callable[[], Any], str] | None] = queue.SimpleQueue()
        self._started = False

    def submit(self, fn: Callable[[], T], owner: str) -> _Call[T]:
        with self._lock:
            if self.held >= self._capacity:
                raise ModelOverloaded("the model is busy: too many requests are waiting for it; retry later")
            mine = self._held_by.get(owner, 0)
            if mine >= self._per_owner:
                raise ModelOverloaded(
                    "the model is busy with this client's earlier requests; retry when they are answered"
                )
            self.held += 1
            self._held_by[owner] = mine + 1
        if not self._started:  # on the first call: a model never asked costs no threads
            self._started = True
            for i in range(self._threads):
                threading.Thread(target=self._work, name=f"{self._name}-{i}", daemon=True).start()
        call: _Call[T] = _Call()
        self._queue.put((call, fn, owner))
        return call

    def _release(self, owner: str) -> None:
        with self._lock:
            self.held -= 1
            left = self._held_by[owner] - 1
            if left:
                self._held_by[owner] = left
            else:
                del self._held_by[owner]

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            call, fn, owner = item
            call.started = time.monotonic()
            if not call.set_running_or_notify_cancel():
                self._release(owner)  # its caller gave up before a thread was free
                continue
            try:
                result = fn()
            except BaseException as e:  # handed to the caller, who maps it
                self._release(owner)
                call.set_exception(e)
            else:
                self._release(owner)
                call.set_result(result)

    def close(self) -> None:
        if self._started:
            for _ in range(self._threads):
                self._queue.put(None)


class _Watchdog:
    """One daemon thread that stops inline calls past their deadline. It looks every `tick` seconds
    instead of being woken per call, so a call costs two dict operations and a deadline is met
    within a tick."""

    def __init__(self, tick: float = 0.01) -> None:
        self._tick = tick
        self._calls: dict[int, tuple[float, Cancel]] = {}
        self._fired: set[int] = set()
        self._ids = itertools.count()
        self._start = threading.Lock()
        self._thread: threading.Thread | None = None

    def watch(self, deadline: float, cancel: Cancel) -> int:
        if self._thread is None:
            with self._start:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="bastion-watchdog", daemon=True)
                    self._thread.start()
        key = next(self._ids)
        self._calls[key] = (deadline, cancel)
        return key

    def done(self, key: int) -> bool:
        """Forget the call; True if its deadline passed and it was stopped."""
        self._calls.pop(key, None)
        if key in self._fired:
            self._fired.discard(key)
            return True
        return False

    def _run(self) -> None:
        while True:
            time.sleep(self._tick)
            now = time.monotonic()
            for key, (deadline, cancel) in list(self._calls.items()):
                if now >= deadline and self._calls.pop(key, None) is not None:
                    self._fired.add(key)
                    cancel.stop()


_WATCHDOG = _Watchdog()


class _Wake:
    """Wakes a request waiting on the event loop for its call: when the call ends (from the
    worker's thread) or after `seconds`, whichever comes first. Lighter than `asyncio.wrap_future`
    with `asyncio.wait`, and it never cancels the call (the caller decides that)."""

    __slots__ = ("_loop", "_waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiter: asyncio.Future[None] | None = None

    def from_thread(self, _: object) -> None:
        # The loop may have closed meanwhile (a shutdown): then nobody waits.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._fire)

    def _fire(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, seconds: float) -> None:
        self._waiter = waiter = self._loop.create_future()
        timer = self._loop.call_later(seconds, self._fire)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None


class GuardedModel:
    """One model version's threads, deadline and breaker.

    `call(fn, cancel, owner)` runs `fn` (the runtime's predict) on one of the model's threads and
    returns its result, or raises `ModelCircuitOpen` (503: the runtime not called), `ModelOverloaded`
    (503: no thread within the queue's bounds; the runtime not called, the breaker not told),
    `InferenceTimeout` (504: the call ran past its deadline, counted from its start on a thread) or
    `ModelFailed` (500). `owner`: the principal's id, whose share of the queue is bounded. `stuck`:
    calls past their deadline whose thread has not returned yet; `held`: calls queued or running.
    With `policy.inline`, `fn` runs on the caller's thread (the event loop, blocked meanwhile) and
    the watchdog stops it at the deadline through `cancel`, which is then required.
    """

    def __init__(
        self,
        name: str,
        policy: BreakerPolicy,
        *,
        clock: Callable[[], float],
        on_transition: Callable[[Transition], None] = lambda t: None,
        on_stuck: Callable[[int], None] = lambda n: None,
        on_timeout: Callable[[], None] = lambda: None,
    ) -> None:
        self.name = name
        self.policy = policy
        self.breaker = CircuitBreaker(policy, clock=clock, on_transition=on_transition)
        self._pool = _Pool(
            policy.threads, f"bastion-model-{name}"[:32], policy.queue, policy.queue_per_principal
        )
        self._on_stuck = on_stuck
        self._on_timeout = on_timeout
        self._stuck_lock = threading.Lock()
        self.stuck = 0

    @property
    def held(self) -> int:
        return self._pool.held

    async def call(self, fn: Callable[[], T], cancel: Cancel | None = None, owner: str = "") -> T:
        if self.policy.inline:
            assert cancel is not None, "inline calls need a runtime that can stop them (checked at load)"
            return self._call_inline(fn, cancel)
        permit = self.breaker.admit(can_probe=self.stuck < self.policy.threads)
        try:
            call = self._pool.submit(fn, owner)
        except ModelOverloaded:
            self.breaker.abandoned(permit)
            raise
        wake = _Wake(asyncio.get_running_loop())
        call.add_done_callback(wake.from_thread)
        timeout = self.policy.inference_timeout
        wait_until = time.monotonic() + self.policy.queue_seconds
        try:
            while not call.done():
                started, now = call.started, time.monotonic()
                if started is None:  # waiting for a thread: the queue's bound
                    if now >= wait_until:
                        if call.cancel():  # no thread took it in time: load, not the model's failure
                            self.breaker.abandoned(permit)
                            raise ModelOverloaded(
                                "the model is busy: no thread was free in time; retry later",
                                OVERLOADED_RETRY_AFTER,
                            )
                        continue  # a thread took it just now (`started` is set first): its deadline runs
                    # Look again at least every `inference_timeout`: a call a thread takes meanwhile
                    # is seen before its deadline has passed, so the deadline is kept exactly.
                    left = min(wait_until - now, timeout)
                else:  # on a thread: the model's own deadline
                    left = started + timeout - now
                    if left <= 0:
                        self._abandon(call, cancel)
                        self._on_timeout()
                        self.breaker.failed(permit, ErrorCode.INFERENCE_TIMEOUT.value)
                        raise InferenceTimeout(timeout)
                await wake.wait(left)
        except asyncio.CancelledError:
            # The request itself was cancelled (a shutdown): no verdict on the model.
            self._abandon(call, cancel)
            self.breaker.abandoned(permit)
            raise
        try:
            result = call.result()
        except Exception as e:
            self.breaker.failed(permit, ErrorCode.INFERENCE_FAILED.value)
            # The type only: a library's message can quote the input.
            log.error("model %s failed: %s", self.name, type(e).__name__)
            raise ModelFailed("the model could not answer this request") from None
        self.breaker.succeeded(permit)
        return result

    def _call_inline(self, fn: Callable[[], T], cancel: Cancel) -> T:
        permit = self.breaker.admit()
        key = _WATCHDOG.watch(time.monotonic() + self.policy.inference_timeout, cancel)
        failure: Exception | None = None
        try:
            result = fn()
        except Exception as e:
            failure = e
        if _WATCHDOG.done(key):  # stopped at its deadline (or it answered just past it): 504
            self._on_timeout()
            self.breaker.failed(permit, ErrorCode.INFERENCE_TIMEOUT.value)
            raise InferenceTimeout(self.policy.inference_timeout)
        if failure is not None:
            self.breaker.failed(permit, ErrorCode.INFERENCE_FAILED.value)
            log.error("model %s failed: %s", self.name, type(failure).__name__)
            raise ModelFailed("the model could not answer this request")
        self.breaker.succeeded(permit)
        return result

    def _abandon(self, future: concurrent.futures.Future[T], cancel: Cancel | None) -> None:
        if future.cancel() or future.done():  # never started, or just finished: nothing holds a thread
            return
        if cancel is not None:
            cancel.stop()
        with self._stuck_lock:
            self.stuck += 1
            stuck = self.stuck
        self._on_stuck(stuck)
        future.add_done_callback(self._returned)

    def _returned(self, _: concurrent.futures.Future[T]) -> None:
        with self._stuck_lock:
            self.stuck -= 1
            stuck = self.stuck
        self._on_stuck(stuck)

    def close(self) -> None:
        """Let the threads end once idle; a stuck one finishes on its own (it cannot be killed, and
        as a daemon thread it does not hold the process open)."""
        self._pool.close()


class ModelGuards:
    """The guarded models of one server, one per served version (name, version, digest), kept
    across policy reloads so that a reload neither closes an open breaker nor forgets stuck calls.

    `clock`: monotonic seconds for the breakers; `observe(model, version, event, value)` receives
    "state" (a Transition), "timeout" and "stuck" (a count) for metrics and the audit log.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float],
        observe: Callable[[str, str, str, object], None] = lambda m, v, e, x: None,
    ) -> None:
        self._clock = clock
        self._observe = observe
        self._models: dict[tuple[str, str, str], GuardedModel] = {}

    def get(self, name: str, version: str, digest: str, policy: BreakerPolicy) -> GuardedModel:
        key = (name, version, digest)
        guarded = self._models.get(key)
        if guarded is None or (guarded.policy is not policy and guarded.policy != policy):
            if guarded is not None:
                guarded.close()  # calls already queued on it still run
            guarded = self._models[key] = GuardedModel(
                name,
                policy,
                clock=self._clock,
                on_transition=lambda t: self._observe(name, version, "state", t),
                on_stuck=lambda n: self._observe(name, version, "stuck", n),
                on_timeout=lambda: self._observe(name, version, "timeout", None),
            )
        return guarded

    def close(self) -> None:
        for guarded in self._models.values():
            guarded.close()
