"""Inference: the runtime predicts for the validated batch (class probabilities, or values)."""

from __future__ import annotations

import logging
import time

from bastion.context import RequestContext
from bastion.errors import BastionError

log = logging.getLogger("bastion.inference")


class ModelFailed(BastionError):
    status = 500
    code = "inference_failed"


class Infer:
    async def __call__(self, ctx: RequestContext) -> None:
        assert ctx.model is not None and ctx.request is not None
        # The model's time alone (not the client's upload, the guard or the audit): a canary's latency.
        started = time.perf_counter()
        try:
            ctx.prediction = ctx.model.runtime.predict(ctx.request.inputs)
        except Exception as e:  # a runtime's own error: log its type for the operator, never the inputs
            ctx.runtime_failed = True
            log.error("model %s failed: %s", ctx.model.name, type(e).__name__)
            raise ModelFailed("the model could not answer this request") from None
        finally:
            ctx.inference_seconds = time.perf_counter() - started
