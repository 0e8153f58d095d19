"""A deadline on every runtime call, and a circuit breaker per model version.

A Python thread cannot be killed, so a runtime call runs in a small thread pool of the model's own
(`inference_threads` threads) while the request waits on the event loop with a deadline
(`inference_timeout_seconds`). At the deadline the request is answered 504 `inference_timeout` and
the call is asked to stop: an ONNX call is stopped for real (onnxruntime's `RunOptions.terminate`,
checked between the graph's nodes, loop iterations included); a call that cannot be stopped (a
scikit-learn estimator) keeps its thread until it returns, and is counted as stuck. A model's stuck
calls are bounded by its pool: a call waiting for a thread past its deadline is cancelled before it
starts, and an open breaker is not probed while every thread is stuck.

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
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

from bastion.errors import ErrorCode, InferenceTimeout, ModelCircuitOpen, ModelFailed

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


class _Pool:
    """A fixed set of daemon threads taking calls from one queue. Not `ThreadPoolExecutor`: its
    threads are joined when the interpreter exits, so one stuck call would hang the shutdown."""

    def __init__(self, threads: int, name: str) -> None:
        self._threads = threads
        self._name = name
        self._queue: queue.SimpleQueue[tuple[concurrent.futures.Future[Any], Callable[[], Any]] | None] = (
            queue.SimpleQueue()
        )
        self._started = False

    def submit(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        if not self._started:  # on the first call: a model never asked costs no threads
            self._started = True
            for i in range(self._threads):
                threading.Thread(target=self._work, name=f"{self._name}-{i}", daemon=True).start()
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._queue.put((future, fn))
        return future

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            future, fn = item
            if not future.set_running_or_notify_cancel():
                continue  # its caller gave up before a thread was free
            try:
                future.set_result(fn())
            except BaseException as e:  # handed to the caller, who maps it
                future.set_exception(e)

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


class GuardedModel:
    """One model version's threads, deadline and breaker.

    `call(fn, cancel)` runs `fn` (the runtime's predict) on one of the model's threads and returns
    its result, or raises `ModelCircuitOpen` (503: the runtime not called), `InferenceTimeout` (504)
    or `ModelFailed` (500). `stuck`: calls past their deadline whose thread has not returned yet.
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
        self._pool = _Pool(policy.threads, f"bastion-model-{name}"[:32])
        self._on_stuck = on_stuck
        self._on_timeout = on_timeout
        self._stuck_lock = threading.Lock()
        self.stuck = 0

    async def call(self, fn: Callable[[], T], cancel: Cancel | None = None) -> T:
        if self.policy.inline:
            assert cancel is not None, "inline calls need a runtime that can stop them (checked at load)"
            return self._call_inline(fn, cancel)
        permit = self.breaker.admit(can_probe=self.stuck < self.policy.threads)
        future = self._pool.submit(fn)
        try:
            # At the deadline the awaited wrapper is cancelled, and with it the call if no thread
            # has taken it yet; a call already running is handled by _abandon.
            async with asyncio.timeout(self.policy.inference_timeout):
                result = await asyncio.wrap_future(future)
        except TimeoutError:
            self._abandon(future, cancel)
            self._on_timeout()
            self.breaker.failed(permit, ErrorCode.INFERENCE_TIMEOUT.value)
            raise InferenceTimeout(self.policy.inference_timeout) from None
        except asyncio.CancelledError:
            # The request itself was cancelled (a shutdown): no verdict on the model.
            self._abandon(future, cancel)
            self.breaker.abandoned(permit)
            raise
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
