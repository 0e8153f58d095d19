"""Inference: the runtime predicts for the validated batch (class probabilities, or values), on the
model's own threads under its deadline and circuit breaker (bastion.breaker)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

from bastion.breaker import ModelGuards
from bastion.context import RequestContext
from bastion.errors import InferenceTimeout, ModelCircuitOpen, ModelFailed, ModelOverloaded

log = logging.getLogger("bastion.inference")

__all__ = ["Infer", "ModelFailed", "run_model"]


def run_model(ctx: RequestContext, predict: Callable[[], np.ndarray]) -> np.ndarray:
    """Call a model (the runtime, or PATE's teachers) for this request.

    A model's own exception is the server's failure, not the client's: it marks the request
    (canary evidence), logs the exception's type only (its message can quote the input), and
    raises `ModelFailed` (500 inference_failed).
    """
    assert ctx.model is not None
    try:
        return predict()
    except Exception as e:
        ctx.runtime_failed = True
        log.error("model %s failed: %s", ctx.model.name, type(e).__name__)
        raise ModelFailed("the model could not answer this request") from None


class Infer:
    """`guards`: the models' deadlines and breakers; None (the unsafe no-defenses baseline only)
    calls the runtime inline on the event loop, with no deadline."""

    def __init__(self, guards: ModelGuards | None = None) -> None:
        self._guards = guards

    async def __call__(self, ctx: RequestContext) -> None:
        model, request = ctx.model, ctx.request
        assert model is not None and request is not None
        runtime, inputs = model.runtime, request.inputs
        # The model's time alone (not the client's upload, the guard or the audit): a canary's latency.
        started = time.perf_counter()
        if self._guards is None:
            try:
                ctx.prediction = run_model(ctx, lambda: runtime.predict(inputs))
            finally:
                ctx.inference_seconds = time.perf_counter() - started
            return
        guarded = self._guards.get(model.name, model.version, model.digest, model.breaker)
        stoppable = getattr(runtime, "stoppable", None)
        run, cancel = stoppable(inputs) if stoppable is not None else (lambda: runtime.predict(inputs), None)
        began: list[float] = []

        def call() -> np.ndarray:
            # The model's time starts when a thread takes the call, not while it waits for one.
            began.append(time.perf_counter())
            return run()

        owner = ctx.principal.id if ctx.principal is not None else ""
        try:
            ctx.prediction = await guarded.call(call, cancel, owner)
        except ModelOverloaded:
            # Load, not the model's failure: refused before the runtime, no evidence for a canary.
            raise
        except ModelCircuitOpen:
            # Refused before the runtime: no evidence for a canary (inference_seconds stays None).
            # The failures that opened the breaker were counted, when the rollout had routed them;
            # counting the refusals too would let a client that opened it with requests naming
            # the canary's version steer its rollback.
            raise
        except (InferenceTimeout, ModelFailed):
            # The server's own failure, never the client's (its bad input was refused before this
            # stage): evidence against a canary, as a runtime's exception always was.
            ctx.runtime_failed = True
            ctx.inference_seconds = time.perf_counter() - (began[0] if began else started)
            raise
        ctx.inference_seconds = time.perf_counter() - (began[0] if began else started)
