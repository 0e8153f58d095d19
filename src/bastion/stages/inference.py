"""Inference: the runtime predicts for the validated batch (class probabilities, or values)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

from bastion.context import RequestContext
from bastion.errors import ModelFailed

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
    async def __call__(self, ctx: RequestContext) -> None:
        assert ctx.model is not None and ctx.request is not None
        runtime, inputs = ctx.model.runtime, ctx.request.inputs
        # The model's time alone (not the client's upload, the guard or the audit): a canary's latency.
        started = time.perf_counter()
        try:
            ctx.prediction = run_model(ctx, lambda: runtime.predict(inputs))
        finally:
            ctx.inference_seconds = time.perf_counter() - started
