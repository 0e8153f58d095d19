"""Input guard: nothing reaches a model that its manifest does not allow.

Body size, well-formed V2 JSON, then for each tensor: declared name, sensitive
grant, datatype, shape, rows, finiteness, and min/max or allowed categories.
A rejection names the input and the rule; it never repeats an input's value, nor a bound.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from bastion.context import RequestContext
from bastion.errors import ErrorCode, PayloadTooLarge, PermissionDenied, SchemaViolation
from bastion.manifest import InputSpec, Manifest
from bastion.protocol import decode_infer_request


class DecodeRequest:
    """Read the body under a hard byte cap and decode it as a V2 inference request."""

    def __init__(self, max_body_bytes: int) -> None:
        self._max = max_body_bytes

    async def __call__(self, ctx: RequestContext) -> None:
        ctx.body = await ctx.read_body(self._max)
        ctx.request = (ctx.decode or decode_infer_request)(ctx.body)


@dataclass(frozen=True, slots=True)
class _CompiledInput:
    spec: InputSpec
    low: np.ndarray | None
    high: np.ndarray | None
    categories: np.ndarray | None
    check_finite: bool
    # Fast path for bounded inputs: |x - mid| <= half is false for NaN, infinity and anything out of range,
    # so one vector test admits a good request; the slow path only runs to explain a rejection.
    mid: np.ndarray | None
    half: np.ndarray | None


def _compile(spec: InputSpec) -> _CompiledInput:
    def bound(value: float | list[float] | None, fill: float) -> np.ndarray:
        return np.asarray(fill if value is None else value, dtype=np.float64)

    cats = None if spec.categories is None else np.asarray(spec.categories, dtype=np.float64)
    low = None if spec.min is None else bound(spec.min, -np.inf)
    high = None if spec.max is None else bound(spec.max, np.inf)
    mid = half = None
    if low is not None and high is not None:
        mid, half = (low + high) / 2, (high - low) / 2
    return _CompiledInput(spec, low, high, cats, spec.numpy_dtype.kind == "f", mid, half)


def _first_column(mask: np.ndarray) -> int:
    """Index of the first offending column (last dimension) in a boolean mask."""
    return int(np.argwhere(mask.reshape(-1, mask.shape[-1]).any(axis=0))[0][0]) if mask.ndim > 1 else 0


class GuardInput:
    def __init__(
        self,
        *,
        max_rows: int,
        hmac_key: bytes,
        on_out_of_distribution: Callable[[RequestContext], Awaitable[None]] | None = None,
    ) -> None:
        self._max_rows = max_rows
        self._hmac_key = hmac_key
        self._on_out_of_distribution = on_out_of_distribution  # query auditing counts refusals too
        self._compiled: dict[int, dict[str, _CompiledInput]] = {}

    def _specs(self, manifest: Manifest) -> dict[str, _CompiledInput]:
        specs = self._compiled.get(id(manifest))
        if specs is None:
            specs = {s.name: _compile(s) for s in manifest.inputs}
            self._compiled[id(manifest)] = specs
        return specs

    async def __call__(self, ctx: RequestContext) -> None:
        request, model, grant = ctx.request, ctx.model, ctx.grant
        assert request is not None and model is not None and grant is not None
        if ctx.rows_from_signed_reference:  # the bundle's own signed reference data
            return
        specs = self._specs(model.manifest)
        for name in request.inputs:
            if name not in specs:
                raise SchemaViolation(
                    f"input {name[:64]!r} is not an input of this model", code=ErrorCode.UNKNOWN_INPUT
                )
        for name, compiled in specs.items():
            if name not in request.inputs:
                raise SchemaViolation(f"input {name!r} is missing", code=ErrorCode.MISSING_INPUT)
            if compiled.spec.sensitive and not grant.sensitive_inputs:
                raise PermissionDenied(
                    f"input {name!r} is sensitive and not granted", code=ErrorCode.SENSITIVE_INPUT_DENIED
                )
        rows = request.rows
        if rows < 1:  # the decoder refuses it too; this guard sees every request the runtime will
            raise SchemaViolation("the request holds no rows", code=ErrorCode.EMPTY_TENSOR)
        if rows > self._max_rows:
            raise PayloadTooLarge(
                f"{rows} rows in one request; at most {self._max_rows}", code=ErrorCode.TOO_MANY_ROWS
            )
        for name, array in request.inputs.items():
            self._check(specs[name], array, rows)
        if model.screen is not None:
            ctx.measured = model.screen.measure(request.inputs, list(specs))
            row = model.screen.first_beyond(ctx.measured[1])
            if row is not None:
                if self._on_out_of_distribution is not None:
                    await self._on_out_of_distribution(ctx)
                # No distance and no value in the message: either would help map the reference data.
                raise SchemaViolation(
                    f"row {row} is outside the distribution this model serves",
                    code=ErrorCode.OUT_OF_DISTRIBUTION,
                )
        ctx.payload_hmac = self._fingerprint(request.inputs)

    @staticmethod
    def _check(c: _CompiledInput, array: np.ndarray, rows: int) -> None:
        spec = c.spec
        if array.dtype != spec.numpy_dtype:
            raise SchemaViolation(
                f"input {spec.name!r}: datatype must be {spec.datatype}", code=ErrorCode.WRONG_DATATYPE
            )
        if array.ndim != len(spec.shape) or any(
            want != -1 and got != want for got, want in zip(array.shape, spec.shape, strict=True)
        ):
            raise SchemaViolation(
                f"input {spec.name!r}: shape must be {spec.shape}", code=ErrorCode.WRONG_SHAPE
            )
        if array.shape[0] != rows:
            raise SchemaViolation(
                f"input {spec.name!r}: every input must have the same number of rows",
                code=ErrorCode.WRONG_SHAPE,
            )
        if c.check_finite and not np.isfinite(array).all():
            raise SchemaViolation(
                f"input {spec.name!r}: NaN or infinity is not allowed", code=ErrorCode.NOT_FINITE
            )
        for bound, outside, words in (
            (c.low, np.less, "below its minimum"),
            (c.high, np.greater, "above its maximum"),
        ):
            if bound is None:
                continue
            mask = outside(array, bound)
            if mask.any():
                # The column, never the bound: bounds are often the training data's range widened, and
                # naming them let a label-only key read every feature's range in two requests and solve
                # for the training set's extremes (red team #9 F14).
                raise SchemaViolation(
                    f"input {spec.name!r}: column {_first_column(mask)} is {words}",
                    code=ErrorCode.OUT_OF_RANGE,
                )
        if c.categories is not None and not np.isin(array, c.categories).all():
            raise SchemaViolation(
                f"input {spec.name!r}: a value is not one of the allowed categories",
                code=ErrorCode.NOT_A_CATEGORY,
            )

    def _fingerprint(self, inputs: dict[str, np.ndarray]) -> str:
        """Keyed HMAC of the canonical tensors: correlates identical inputs without storing them."""
        parts = []
        for name in sorted(inputs):
            array = inputs[name]
            parts.append(f"{name}\0{array.dtype.str}\0{array.shape}\0".encode())
            parts.append(array.tobytes())  # C order whatever the layout
        return hmac.digest(self._hmac_key, b"".join(parts), hashlib.sha256).hex()
