"""Differentially private statistics over a batch: per-class counts, sums and means of predictions
(for a regressor: the sum and mean of its values).

Adding or removing one row changes the predicted-label histogram by 1 in one class
and the per-class sum of probabilities by at most 1 in L1 (a row's probabilities
sum to 1), so each statistic is released through OpenDP's Laplace mechanism at
scale 1/epsilon and costs `epsilon`; means are the noisy sums over the batch size,
which the caller already knows (post-processing). A regressor's values are clamped to the
declared range; their sum, scaled to [0, 1] per row, has sensitivity 1 too. An identical batch from the same
principal gets the identical answer from the keyed cache and spends nothing.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bastion.context import InferRequest, RequestContext
from bastion.errors import BadRequest, ErrorCode, PermissionDenied, SchemaViolation
from bastion.privacy import laplace_scale, policy_tag
from bastion.protocol import decode_infer_document, json_reader, parse_json
from bastion.stages.output_policy import EPSILON, PrivateScores


class AggregateSource:
    """The rows to aggregate: a submitted V2 batch, or `{"reference": true}` for the bundle's reference set."""

    def __init__(self, max_body_bytes: int) -> None:
        self._max = max_body_bytes

    async def __call__(self, ctx: RequestContext) -> None:
        model = ctx.model
        assert model is not None
        # Refused before the body is read: a model without aggregates spends no guard or inference on one.
        if not model.aggregates:
            raise PermissionDenied(
                f"aggregates are not offered for model {model.name!r}", code=ErrorCode.AGGREGATES_DISABLED
            )
        body = await ctx.read_body(self._max)
        if ctx.decode is not None:  # a transport's own encoding (binary tensors): a batch, never "reference"
            ctx.request = _statistics_only(ctx.decode(body))
            return
        doc = parse_json(body)
        if isinstance(doc, dict) and doc.get("reference") is True:
            if len(doc) > 1:
                # Inputs (or anything else) beside it would be ignored: the answer is about the bundle's
                # reference set, not about what the caller sent (red team #9 F12).
                raise BadRequest(
                    '{"reference": true} takes no other field: aggregate a batch of inputs, or the reference set',
                    code=ErrorCode.MALFORMED_REQUEST,
                )
            if model.reference is None:
                raise SchemaViolation(
                    f"model {model.name!r} has no reference dataset", code=ErrorCode.NO_REFERENCE_DATA
                )
            rows = next(iter(model.reference.values())).shape[0]
            ctx.request = InferRequest(None, dict(model.reference), None, {}, rows)
            # Signed data from the bundle: no input guard, and a fixed cache key.
            ctx.payload_hmac = f"reference:{model.digest}"
            ctx.rows_from_signed_reference = True
            return
        ctx.request = _statistics_only(decode_infer_document(doc, json_reader(body)))


def _statistics_only(request: InferRequest) -> InferRequest:
    # An aggregate answers statistics, not output tensors: a request for raw output bytes would be
    # accepted and ignored, so it is refused.
    if request.binary_outputs:
        raise BadRequest(
            "aggregates answer JSON statistics; binary_data outputs are not offered",
            code=ErrorCode.UNSUPPORTED_PARAMETER,
        )
    return request


class ComputeAggregates:
    """Noisy counts, sums and means, released through the same keyed cache and budgets as dp_scores
    (one epsilon account per principal, model and window)."""

    def __init__(self, scores: PrivateScores) -> None:
        self._scores = scores

    async def __call__(self, ctx: RequestContext) -> None:
        model, request, proba, grant = ctx.model, ctx.request, ctx.prediction, ctx.grant
        assert model is not None and request is not None and proba is not None and grant is not None
        if request.rows < 1:  # the decoder refuses it first; a mean over nothing must never be charged
            raise SchemaViolation("an aggregate over no rows", code=ErrorCode.EMPTY_TENSOR)
        params = grant.output_params
        value_range = model.manifest.outputs.value_range
        # Counts are integers already; sums are rounded to the noise source's grid. Each statistic
        # (row of `exact`) costs epsilon.
        exact = _exact(np.asarray(proba, dtype=np.float64), value_range)
        noise = self._scores.noise
        scale = laplace_scale(
            params.epsilon, coordinates=exact.shape[1], resolution=noise.resolution, sensitivity=1.0
        )
        released, cost = await self._scores.release(
            ctx,
            params,
            unit=EPSILON,
            policy=policy_tag("aggregate", params.epsilon),
            cost=exact.shape[0] * params.epsilon,
            compute=lambda: noise.laplace(exact, scale),
        )
        ctx.epsilon_spent = cost
        rows = request.rows
        if value_range is not None:
            low, high = value_range
            total = low * rows + (high - low) * float(released[0, 0])
            statistics: dict[str, Any] = {"sum": total, "mean": total / rows}
        else:
            classes = model.manifest.outputs.classes
            assert classes is not None
            statistics = {
                "count": dict(zip(classes, released[0].tolist(), strict=True)),
                "sum": dict(zip(classes, released[1].tolist(), strict=True)),
                "mean": dict(zip(classes, (released[1] / rows).tolist(), strict=True)),
            }
        ctx.result = {
            "model_name": model.name,
            "model_version": model.version,
            "rows": rows,
            "epsilon_spent": cost,
            "statistics": statistics,
        }


def _exact(prediction: np.ndarray, value_range: tuple[float, float] | None) -> np.ndarray:
    """The statistics before noise, one per row of the result, each of sensitivity 1 (L1).

    A classifier: the predicted-label counts and the per-class sums of probabilities. A
    regressor: the sum of its values clamped to the declared range and scaled to [0, 1], so
    that one row moves it by at most 1 (the sum is scaled back after the noise).
    """
    if value_range is None:
        counts = np.bincount(prediction.argmax(axis=1), minlength=prediction.shape[1]).astype(np.float64)
        return np.vstack([counts, prediction.sum(axis=0)])
    low, high = value_range
    unit = (np.clip(prediction, low, high) - low) / (high - low)
    return np.asarray(unit.sum(axis=0, keepdims=True))
