"""Output policy: the answer says no more than the caller's grant allows, whatever it asks for.

`label` returns the top class only; `probabilities` adds the scores. Richer
policies (top-k, rounding, DP noise) plug in here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bastion.config import OutputDetail
from bastion.context import RequestContext
from bastion.errors import PermissionDenied, SchemaViolation
from bastion.protocol import encode_infer_response

LABEL = "label"
PROBABILITIES = "probabilities"
_NEEDS = {LABEL: OutputDetail.LABEL, PROBABILITIES: OutputDetail.PROBABILITIES}


def output_names(detail: OutputDetail) -> list[str]:
    return [name for name, need in _NEEDS.items() if need.rank <= detail.rank]


class ShapeOutput:
    async def __call__(self, ctx: RequestContext) -> None:
        model, request, proba, detail = ctx.model, ctx.request, ctx.probabilities, ctx.output_detail
        assert model is not None and request is not None and proba is not None and detail is not None
        wanted = request.requested_outputs or output_names(detail)
        for name in wanted:
            need = _NEEDS.get(name)
            if need is None:
                raise SchemaViolation(
                    f"output {name[:64]!r} is not an output of this model", code="unknown_output"
                )
            if need.rank > detail.rank:
                raise PermissionDenied(f"output {name!r} is not granted", code="output_not_granted")
        classes = model.manifest.outputs.classes
        outputs: list[dict[str, Any]] = []
        if LABEL in wanted:
            top = np.argmax(proba, axis=1)
            outputs.append(
                {"name": LABEL, "datatype": "BYTES", "shape": [len(top)], "data": [classes[i] for i in top]}
            )
        if PROBABILITIES in wanted:
            outputs.append(
                {
                    "name": PROBABILITIES,
                    "datatype": "FP32",
                    "shape": list(proba.shape),
                    "data": proba.astype(np.float32).ravel().tolist(),
                }
            )
        ctx.result = encode_infer_response(
            model=model.name, version=model.version, request_id=request.id, outputs=outputs
        )
