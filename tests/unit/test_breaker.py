"""The circuit breaker's state machine (injected clock) and a guarded model's deadline, threads and
stuck-call accounting, with blocking calls and with a real ONNX model that a deadline stops."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bastion.breaker import BreakerPolicy, BreakerState, CircuitBreaker, GuardedModel, ModelGuards, Transition
from bastion.config import load_config
from bastion.errors import (
    HTTP_STATUS,
    ConfigError,
    ErrorCode,
    InferenceTimeout,
    ModelCircuitOpen,
    ModelFailed,
    ModelOverloaded,
    grpc_status,
)
from bastion.manifest import read_manifest
from bastion.registry import ModelRegistry
from bastion.routes import Route
from bastion.runtimes import load_runtime
from bastion.service import Bastion
from tests.helpers import core_context, write_loan_model
from tests.slow_model import FAST, HANG, slow_request, write_slow_model


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def breaker(**fields: Any) -> tuple[CircuitBreaker, Clock, list[Transition]]:
    clock, seen = Clock(), list[Transition]()
    policy = replace(BreakerPolicy(failures=3, window=10.0, open_seconds=5.0, half_open_probes=2), **fields)
    return CircuitBreaker(policy, clock=clock, on_transition=seen.append), clock, seen


def state(b: CircuitBreaker) -> BreakerState:
    return b.state


def test_codes_and_statuses() -> None:
    assert HTTP_STATUS[ErrorCode.INFERENCE_TIMEOUT] == 504
    assert HTTP_STATUS[ErrorCode.MODEL_CIRCUIT_OPEN] == 503
    assert grpc_status(ErrorCode.INFERENCE_TIMEOUT) == "DEADLINE_EXCEEDED"
    assert grpc_status(ErrorCode.MODEL_CIRCUIT_OPEN) == "UNAVAILABLE"


def test_closed_opens_after_failures_in_a_row_within_the_window() -> None:
    b, clock, seen = breaker()
    for _ in range(2):
        b.failed(b.admit(), "inference_failed")
    b.succeeded(b.admit())  # a success between them: the count starts over
    b.failed(b.admit(), "inference_failed")
    clock.now += 11  # the window passes: the old failure is forgotten
    b.failed(b.admit(), "inference_failed")
    b.failed(b.admit(), "inference_timeout")
    assert state(b) is BreakerState.CLOSED and seen == []
    b.failed(b.admit(), "inference_timeout")
    assert state(b) is BreakerState.OPEN
    assert seen[-1].previous is BreakerState.CLOSED and seen[-1].reason == "failures"
    assert "inference_timeout" in seen[-1].detail


def test_open_refuses_then_half_open_probes_close_it() -> None:
    b, clock, seen = breaker()
    for _ in range(3):
        b.failed(b.admit(), "inference_failed")
    with pytest.raises(ModelCircuitOpen) as refused:
        b.admit()
    assert refused.value.retry_after == pytest.approx(5.0) and refused.value.status == 503
    clock.now += 4
    assert b.open_for() == pytest.approx(1.0)
    with pytest.raises(ModelCircuitOpen):
        b.admit()
    clock.now += 1
    first, second = b.admit(), b.admit()  # half-open: two probes at once
    assert state(b) is BreakerState.HALF_OPEN and seen[-1].reason == "open_elapsed"
    with pytest.raises(ModelCircuitOpen):
        b.admit()  # a third waits for their verdict
    b.succeeded(first)
    assert state(b) is BreakerState.HALF_OPEN
    b.succeeded(second)
    assert state(b) is BreakerState.CLOSED and seen[-1].reason == "probes_succeeded"
    b.succeeded(b.admit())
    assert [t.state for t in seen] == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED]


def test_a_failed_probe_opens_it_again_for_a_full_period() -> None:
    b, clock, seen = breaker(half_open_probes=1)
    for _ in range(3):
        b.failed(b.admit(), "inference_timeout")
    clock.now += 5
    b.failed(b.admit(), "inference_timeout")
    assert state(b) is BreakerState.OPEN and seen[-1].reason == "probe_failed"
    clock.now += 4.9
    with pytest.raises(ModelCircuitOpen):
        b.admit()


def test_a_late_result_from_another_state_is_not_a_verdict() -> None:
    b, clock, _ = breaker(half_open_probes=1)
    slow = b.admit()  # let through while closed, answers long after
    for _ in range(3):
        b.failed(b.admit(), "inference_failed")
    clock.now += 5
    probe = b.admit()
    b.failed(slow, "inference_timeout")  # not the probe's verdict
    assert state(b) is BreakerState.HALF_OPEN
    b.abandoned(probe)  # the probe's request was cancelled: its slot is free again
    b.succeeded(b.admit())
    assert state(b) is BreakerState.CLOSED


def test_an_open_breaker_with_every_thread_stuck_is_not_probed() -> None:
    b, clock, _ = breaker()
    for _ in range(3):
        b.failed(b.admit(), "inference_timeout")
    clock.now += 60
    with pytest.raises(ModelCircuitOpen):
        b.admit(can_probe=False)
    assert state(b) is BreakerState.OPEN
    b.admit(can_probe=True)
    assert state(b) is BreakerState.HALF_OPEN


def guarded(**fields: Any) -> tuple[GuardedModel, Clock, list[int]]:
    clock, stuck = Clock(), list[int]()
    policy = replace(BreakerPolicy(inference_timeout=0.2, threads=1, failures=2, open_seconds=5.0), **fields)
    return GuardedModel("m", policy, clock=clock, on_stuck=stuck.append), clock, stuck


@pytest.mark.slow
def test_a_hung_call_is_answered_at_its_deadline_and_counted_stuck_until_it_returns() -> None:
    async def scenario() -> None:
        model, clock, stuck = guarded(queue_seconds=0.3)
        release = threading.Event()
        calls = []

        def hang() -> int:
            calls.append(1)
            release.wait(10)
            return 1

        async def until_unstuck() -> None:
            for _ in range(100):
                if model.stuck == 0:
                    break
                await asyncio.sleep(0.01)
            assert model.stuck == 0 and stuck[-1] == 0

        began = time.monotonic()
        with pytest.raises(InferenceTimeout) as timeout:
            await model.call(hang)
        assert 0.2 <= time.monotonic() - began < 0.6
        assert timeout.value.status == 504
        assert model.stuck == 1 and stuck == [1]
        # The one thread is stuck: a second call waits for it, and at the queue's bound it is
        # refused 503 model_overloaded, unstarted. That is load, not the model's second failure.
        began = time.monotonic()
        with pytest.raises(ModelOverloaded) as overloaded:
            await model.call(hang)
        assert 0.3 <= time.monotonic() - began < 0.7
        assert overloaded.value.status == 503 and overloaded.value.code == "model_overloaded"
        assert model.stuck == 1 and len(calls) == 1
        assert state(model.breaker) is BreakerState.CLOSED
        release.set()
        await until_unstuck()
        release.clear()
        with pytest.raises(InferenceTimeout):
            await model.call(hang)
        assert state(model.breaker) is BreakerState.OPEN  # two timeouts in a row (the overload between)
        # Open: refused at once, the runtime not called.
        began = time.monotonic()
        with pytest.raises(ModelCircuitOpen):
            await model.call(hang)
        assert time.monotonic() - began < 0.05 and len(calls) == 2
        clock.now += 5
        with pytest.raises(ModelCircuitOpen):  # every thread stuck: no probe
            await model.call(lambda: 2)
        release.set()
        await until_unstuck()
        assert await model.call(lambda: 2) == 2  # the probe
        assert state(model.breaker) is BreakerState.CLOSED
        model.close()

    asyncio.run(scenario())


@pytest.mark.slow
def test_the_deadline_counts_from_the_start_on_a_thread_not_the_wait_for_one() -> None:
    """The red team's finding 6, in-process: one principal's many valid calls (0.15 s each, 1 s
    deadline, one thread) used to wait past the deadline, be counted as timeouts and open the
    breaker for everyone. Now no call is a timeout, the breaker never moves, the surplus is refused
    503 model_overloaded at once (the principal's share of the queue), and another principal's call
    is answered."""

    async def scenario() -> None:
        seen: list[Transition] = []
        model = GuardedModel(
            "m",
            BreakerPolicy(inference_timeout=1.0, threads=1, failures=5, queue=16, queue_per_principal=8),
            clock=time.monotonic,
            on_transition=seen.append,
        )

        def work() -> int:
            time.sleep(0.15)
            return 1

        flood = [asyncio.ensure_future(model.call(work, owner="key:attacker")) for _ in range(40)]
        await asyncio.sleep(0)
        victim = asyncio.ensure_future(model.call(lambda: 2, owner="key:victim"))
        results = await asyncio.gather(*flood, return_exceptions=True)
        assert await victim == 2
        answered = [r for r in results if r == 1]
        refused = [r for r in results if isinstance(r, ModelOverloaded)]
        assert len(answered) + len(refused) == 40, results  # no 504, no 500, no circuit open
        # One thread plus inference_queue_per_principal (8 here) places: the rest refused at once.
        assert len(answered) == 1 + 8 and seen == [] and state(model.breaker) is BreakerState.CLOSED
        model.close()

    asyncio.run(scenario())


def test_a_raising_runtime_is_a_server_failure_that_names_only_its_type(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        model, _, _ = guarded()

        def broken() -> int:
            raise ValueError("input row 7 was secret-value-123")

        for _ in range(2):
            with pytest.raises(ModelFailed) as failed:
                await model.call(broken)
            assert failed.value.status == 500 and "secret" not in failed.value.message
        assert state(model.breaker) is BreakerState.OPEN
        model.close()

    asyncio.run(scenario())
    assert "ValueError" in caplog.text and "secret-value-123" not in caplog.text


@pytest.mark.slow
def test_the_deadline_stops_a_real_onnx_call(tmp_path: Path) -> None:
    write_slow_model(tmp_path)
    runtime = load_runtime(tmp_path, read_manifest(tmp_path))

    async def scenario() -> None:
        model, _, _ = guarded(inference_timeout=0.3, failures=10)
        run, cancel = runtime.stoppable({"work": np.array([[HANG]], np.float32)})  # type: ignore[attr-defined]
        began = time.monotonic()
        with pytest.raises(InferenceTimeout):
            await model.call(run, cancel)
        assert time.monotonic() - began < 0.8
        # onnxruntime saw the terminate flag: the thread is back within moments, not half an hour.
        for _ in range(100):
            if model.stuck == 0:
                break
            await asyncio.sleep(0.01)
        assert model.stuck == 0
        fast, cancel = runtime.stoppable({"work": np.array([[FAST]], np.float32)})  # type: ignore[attr-defined]
        assert (await model.call(fast, cancel)).tolist() == [[0.5, 0.5]]
        model.close()

    asyncio.run(scenario())


def _policy_file(tmp_path: Path, fields: str) -> Path:
    write_slow_model(tmp_path / "slow")
    path = tmp_path / "bastion.toml"
    path.write_text(f'[[models]]\npath = "slow"\nunsafe_unsigned = true\n{fields}')
    return path


def test_the_guard_is_on_by_default(tmp_path: Path) -> None:
    (model,) = ModelRegistry.load(list(load_config(_policy_file(tmp_path, "")).models)).models()
    assert model.breaker == BreakerPolicy(10.0, 1, 5, 60.0, 30.0, 1)


@pytest.mark.parametrize(
    "line",
    [
        "inference_timeout_seconds = 0",
        "inference_timeout_seconds = 3601",
        "inference_threads = 0",
        "inference_threads = 65",
        "breaker_failures = 0",
        "breaker_window_seconds = 0",
        "breaker_open_seconds = -1",
        "breaker_half_open_probes = 0",
        "breaker_half_open_probes = 101",
        "inference_queue = -1",
        "inference_queue = 10001",
        "inference_queue_per_principal = -1",
        "inference_queue_seconds = 0",
        "inference_queue_seconds = 3601",
    ],
)
def test_out_of_range_settings_are_refused_naming_the_field(tmp_path: Path, line: str) -> None:
    with pytest.raises(ConfigError, match=line.split(" ")[0]):
        load_config(_policy_file(tmp_path, line + "\n"))


@pytest.mark.slow
def test_the_policy_files_threads_and_window_are_the_guards(tmp_path: Path) -> None:
    fields = (
        "inference_timeout_seconds = 0.3\ninference_threads = 2\nbreaker_failures = 2\n"
        "breaker_window_seconds = 7\nbreaker_open_seconds = 9\nbreaker_half_open_probes = 3\n"
        "inference_queue_seconds = 0.6\n"
    )
    (model,) = ModelRegistry.load(list(load_config(_policy_file(tmp_path, fields)).models)).models()
    assert model.breaker == BreakerPolicy(0.3, 2, 2, 7.0, 9.0, 3, queue_seconds=0.6)

    async def scenario() -> None:
        clock = Clock()
        guards = ModelGuards(clock=clock)
        guarded = guards.get(model.name, model.version, model.digest, model.breaker)
        # breaker_window_seconds: two failures 8 s apart are not "in a row within 7 s".
        for _ in range(2):
            with pytest.raises(ModelFailed):
                await guarded.call(lambda: 1 / 0)
            clock.now += 8
        assert state(guarded.breaker) is BreakerState.CLOSED
        # inference_threads: of three hung calls at once, two hold the model's two threads and the
        # third, unstarted, is refused as load at its inference_queue_seconds: two stuck, never more.
        release, started = threading.Event(), []

        def hang() -> None:
            started.append(1)
            release.wait(10)

        results = await asyncio.gather(*(guarded.call(hang) for _ in range(3)), return_exceptions=True)
        assert [type(r) for r in results] == [InferenceTimeout, InferenceTimeout, ModelOverloaded]
        assert guarded.stuck == 2 and len(started) == 2
        release.set()
        guards.close()

    asyncio.run(scenario())


@pytest.mark.slow
def test_the_policy_files_queue_bounds_hold_and_refuse_as_load_never_as_failure(tmp_path: Path) -> None:
    """From the attacker's side: one principal floods a model whose one thread is busy. Its surplus
    is refused at once (its share of the queue), another principal still finds places until the
    queue is full, the queue never holds more than its bound (memory does not grow with the
    flood), and the calls that waited too long are refused as load: with breaker_failures = 1 a
    single counted failure would open the breaker, and it stays closed."""
    fields = (
        "inference_timeout_seconds = 3\ninference_threads = 1\nbreaker_failures = 1\n"
        "inference_queue = 4\ninference_queue_per_principal = 2\ninference_queue_seconds = 0.5\n"
    )
    (model,) = ModelRegistry.load(list(load_config(_policy_file(tmp_path, fields)).models)).models()
    assert (model.breaker.queue, model.breaker.queue_per_principal, model.breaker.queue_seconds) == (4, 2, 0.5)

    async def scenario() -> None:
        seen: list[object] = []
        guards = ModelGuards(clock=time.monotonic, observe=lambda m, v, e, x: seen.append(x))
        guarded = guards.get(model.name, model.version, model.digest, model.breaker)
        gate = threading.Event()

        def work() -> int:
            gate.wait(10)
            return 1

        began = time.monotonic()
        flood = [asyncio.ensure_future(guarded.call(work, owner="key:attacker")) for _ in range(200)]
        await asyncio.sleep(0.05)
        # The thread and the attacker's two places: 3 held; 197 refused without waiting.
        assert guarded.held == 3
        refused = [f for f in flood if f.done()]
        assert len(refused) == 197 and all(isinstance(f.exception(), ModelOverloaded) for f in refused)
        assert "this client's earlier requests" in str(refused[0].exception())
        others = [asyncio.ensure_future(guarded.call(work, owner="key:victim")) for _ in range(3)]
        await asyncio.sleep(0.05)
        # The victim's two fill the queue (4 places beyond the thread); its third finds it full.
        assert guarded.held == 5 == 1 + 4
        assert isinstance(others[2].exception(), ModelOverloaded)
        assert "too many requests are waiting" in str(others[2].exception())
        # inference_queue_seconds: the four waiting calls are refused at 0.5 s, unstarted; the one
        # on the thread is not timed by its wait and answers when the gate opens.
        waiting = [f for f in flood if not f.done()][1:] + others[:2]
        for f in waiting:
            with pytest.raises(ModelOverloaded, match="no thread was free in time"):
                await f
        assert 0.5 <= time.monotonic() - began < 1.5
        gate.set()
        assert await flood[0] == 1
        assert await guarded.call(lambda: 2, owner="key:victim") == 2
        for _ in range(100):  # the refused calls' places are freed as the thread drops them
            if guarded.held == 0:
                break
            await asyncio.sleep(0.01)
        assert guarded.held == 0
        assert state(guarded.breaker) is BreakerState.CLOSED and seen == []
        guards.close()

    asyncio.run(scenario())


def test_queue_settings_that_would_be_ignored_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="inference_queue_per_principal is above inference_queue"):
        load_config(_policy_file(tmp_path, "inference_queue = 2\ninference_queue_per_principal = 3\n"))
    for line in ("inference_queue = 2", "inference_queue_per_principal = 1", "inference_queue_seconds = 1"):
        with pytest.raises(ConfigError, match=f'{line.split(" ")[0]} applies to inference_isolation = "thread"'):
            load_config(_policy_file(tmp_path, f'inference_isolation = "inline"\n{line}\n'))


def test_a_timeout_is_the_servers_failure_for_the_rollout_and_a_bad_input_is_not(tmp_path: Path) -> None:
    """Through the whole pipeline in process: a 504 marks the request as the runtime's failure (the
    canary rollout's evidence); a 422 never reaches the runtime, nor does a 503 of the open breaker
    (no evidence: else a client that opened it could steer a rollback); each transition is audited."""
    fields = "inference_timeout_seconds = 0.2\nbreaker_failures = 1\n"
    path = _policy_file(tmp_path, fields)
    path.write_text(
        '[server]\nstate_dir = "state"\n[state]\nbackend = "memory"\n'
        + path.read_text()
        + '[roles.r]\ngrants = [ { models = ["slow"], actions = ["infer"] } ]\n'
    )

    async def scenario() -> list[tuple[int, bool, bool]]:
        service = Bastion(load_config(path), config_path=path)
        await service.startup()
        secret = service.keys.create(name="k", roles=["r"], now=time.time()).secret
        seen = []
        for work in (-1.0, HANG, FAST):
            ctx = core_context(Route.INFER, f"Bearer {secret}", slow_request(work), model_name="slow")
            outcome = await service.handle(Route.INFER, ctx)
            seen.append((outcome.status, ctx.runtime_failed, ctx.inference_seconds is not None))
        await service.aclose()
        return seen

    # 422: never reached the runtime; 504: its failure; 503 (open): refused before it, no evidence.
    assert asyncio.run(scenario()) == [(422, False, False), (504, True, True), (503, False, False)]
    with sqlite3.connect(tmp_path / "state" / "audit.db") as db:
        bodies = [json.loads(b) for (b,) in db.execute("SELECT body FROM records ORDER BY seq")]
    assert [(b["decision"], b["reason"]) for b in bodies if b.get("route") == "breaker"] == [
        ("open", "failures")
    ]


def test_an_overloaded_model_is_refused_as_load_audited_and_no_evidence_for_the_rollout(tmp_path: Path) -> None:
    """Through the whole pipeline in process: while the one thread is busy and no call may wait
    (inference_queue = 0), a second request is refused 503 model_overloaded with Retry-After, is
    audited as the request's refusal, is no evidence for a canary (neither a failure nor a
    latency), and with breaker_failures = 1 the breaker still never moves."""
    fields = "inference_timeout_seconds = 2\nbreaker_failures = 1\ninference_queue = 0\n"
    path = _policy_file(tmp_path, fields)
    path.write_text(
        '[server]\nstate_dir = "state"\n[state]\nbackend = "memory"\n'
        + path.read_text()
        + '[roles.r]\ngrants = [ { models = ["slow"], actions = ["infer"] } ]\n'
    )

    async def scenario() -> list[tuple[int, object, str | None, bool, bool]]:
        service = Bastion(load_config(path), config_path=path)
        await service.startup()
        secret = service.keys.create(name="k", roles=["r"], now=time.time()).secret
        contexts = [
            core_context(Route.INFER, f"Bearer {secret}", slow_request(work), model_name="slow")
            for work in (150_000.0, FAST)
        ]
        busy = asyncio.ensure_future(service.handle(Route.INFER, contexts[0]))
        await asyncio.sleep(0.05)  # the first holds the thread (about 0.2 s of work)
        outcomes = [await service.handle(Route.INFER, contexts[1]), await busy]
        await service.aclose()
        seen = []
        for outcome, ctx in zip(outcomes, reversed(contexts), strict=True):
            assert isinstance(outcome.body, dict)
            code, retry_after = outcome.body.get("code"), outcome.headers.get("Retry-After")
            seen.append((outcome.status, code, retry_after, ctx.runtime_failed, ctx.inference_seconds is not None))
        return seen

    assert asyncio.run(scenario()) == [(503, "model_overloaded", "1", False, False), (200, None, None, False, True)]
    with sqlite3.connect(tmp_path / "state" / "audit.db") as db:
        bodies = [json.loads(b) for (b,) in db.execute("SELECT body FROM records ORDER BY seq")]
    assert [b["reason"] for b in bodies if b.get("route") == "infer" and b.get("decision") != "allow"] == [
        "model_overloaded"
    ]
    assert [b for b in bodies if b.get("route") == "breaker"] == []


@pytest.mark.slow
def test_inline_isolation_holds_the_event_loop_until_the_deadline_and_thread_isolation_does_not(
    tmp_path: Path,
) -> None:
    """inference_isolation: both answer a hung ONNX call 504 at its deadline and serve the next
    request; "thread" keeps the event loop turning meanwhile, "inline" holds it until the watchdog
    stops the call."""
    write_slow_model(tmp_path / "inline", "slow-inline")
    write_slow_model(tmp_path / "thread", "slow-thread")
    path = tmp_path / "bastion.toml"
    path.write_text(
        '[server]\nstate_dir = "state"\n[state]\nbackend = "memory"\n'
        '[[models]]\npath = "inline"\nunsafe_unsigned = true\ninference_timeout_seconds = 0.4\n'
        'inference_isolation = "inline"\n'
        '[[models]]\npath = "thread"\nunsafe_unsigned = true\ninference_timeout_seconds = 0.4\n'
        '[roles.r]\ngrants = [ { models = ["*"], actions = ["infer"] } ]\n'
    )

    async def scenario() -> dict[str, tuple[list[int], int, float]]:
        service = Bastion(load_config(path), config_path=path)
        await service.startup()
        secret = service.keys.create(name="k", roles=["r"], now=time.time()).secret
        seen = {}
        for name in ("slow-inline", "slow-thread"):
            ticks = 0

            async def ticker() -> None:
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.01)
                    ticks += 1

            task = asyncio.create_task(ticker())
            await asyncio.sleep(0.05)
            ticks, statuses, began = 0, [], time.monotonic()
            for work in (HANG, FAST):
                ctx = core_context(Route.INFER, f"Bearer {secret}", slow_request(work), model_name=name)
                statuses.append((await service.handle(Route.INFER, ctx)).status)
                if work == HANG:
                    elapsed, during = time.monotonic() - began, ticks
            task.cancel()
            seen[name] = (statuses, during, elapsed)
        await service.aclose()
        return seen

    seen = asyncio.run(scenario())
    for name in ("slow-inline", "slow-thread"):
        statuses, _, elapsed = seen[name]
        assert statuses == [504, 200], name
        assert 0.4 <= elapsed < 0.9, name
    assert seen["slow-inline"][1] <= 2  # the loop was held: the ticker did not run
    assert seen["slow-thread"][1] >= 15  # the loop kept turning every 10 ms


def test_inline_isolation_is_refused_where_it_could_not_stop_a_call_or_would_ignore_threads(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError, match='inference_threads applies to inference_isolation = "thread"'):
        load_config(_policy_file(tmp_path, 'inference_isolation = "inline"\ninference_threads = 2\n'))
    write_loan_model(tmp_path / "loan")  # scikit-learn: its calls cannot be stopped
    path = tmp_path / "loan.toml"
    path.write_text('[[models]]\npath = "loan"\nunsafe_unsigned = true\ninference_isolation = "inline"\n')
    registry = ModelRegistry.load(list(load_config(path).models))
    assert not registry.models()
    (reason,) = registry.failures.values()
    assert 'inference_isolation = "inline" needs a runtime whose calls can be stopped' in reason
