"""Open Inference Protocol V2 (KServe / MLServer / Triton) JSON codec. No policy here.

Decoding checks only that a request is well formed and that each tensor's data
fits the datatype and shape the request itself declares; whether it fits the
model is the input guard's job. A tensor with a zero dimension, or inputs with
different row counts, are refused here (422), before any stage spends anything.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import orjson

from bastion.context import InferRequest
from bastion.errors import BadRequest, ErrorCode, SchemaViolation
from bastion.manifest import V2_TO_NUMPY

# Which numpy kinds of JSON-parsed data may become each target kind without losing information.
_ACCEPTED_KINDS = {"f": "iuf", "i": "iu", "u": "iu", "b": "b"}
_MAX_INPUTS = 64
_MAX_DIMS = 8


def parse_json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    # Python clients send NaN/Infinity literals; accept them here so the guard answers 422, not 400.
    if b"NaN" in body or b"Infinity" in body:
        try:
            return json.loads(body)
        except (ValueError, RecursionError):
            pass
    raise BadRequest("request body is not valid JSON (UTF-8)", code=ErrorCode.MALFORMED_JSON)


def _tensor(entry: Any, index: int) -> tuple[str, np.ndarray]:
    if not isinstance(entry, dict):
        raise BadRequest(f"inputs[{index}] must be an object", code=ErrorCode.MALFORMED_REQUEST)
    name, datatype, shape, data = (entry.get(k) for k in ("name", "datatype", "shape", "data"))
    if not isinstance(name, str) or not name:
        raise BadRequest(f"inputs[{index}].name must be a non-empty string", code=ErrorCode.MALFORMED_REQUEST)
    label = f"input {name[:64]!r}"
    if not isinstance(datatype, str):
        raise BadRequest(f"{label}: datatype must be a string", code=ErrorCode.MALFORMED_REQUEST)
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= _MAX_DIMS
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise BadRequest(
            f"{label}: shape must be a list of 1 to {_MAX_DIMS} non-negative integers",
            code=ErrorCode.MALFORMED_REQUEST,
        )
    if 0 in shape:
        # Nothing to infer: no runtime, screen or privacy mechanism is defined on an empty batch.
        raise SchemaViolation(f"{label}: shape {shape} has a zero dimension", code=ErrorCode.EMPTY_TENSOR)
    if data is None:
        raise BadRequest(f"{label}: data is missing", code=ErrorCode.MALFORMED_REQUEST)
    target = V2_TO_NUMPY.get(datatype)
    if target is None:
        raise SchemaViolation(
            f"{label}: datatype {datatype[:16]!r} is not supported", code=ErrorCode.UNSUPPORTED_DATATYPE
        )
    try:
        array = np.asarray(data)
    except (ValueError, OverflowError):
        raise SchemaViolation(
            f"{label}: data is ragged or not numeric", code=ErrorCode.WRONG_DATATYPE
        ) from None
    if array.dtype.kind not in _ACCEPTED_KINDS[target.kind]:
        raise SchemaViolation(f"{label}: data does not hold {datatype} values", code=ErrorCode.WRONG_DATATYPE)
    if target.kind in "iu" and array.size:
        info = np.iinfo(target)  # type: ignore[type-var]
        if array.min() < info.min or array.max() > info.max:
            raise SchemaViolation(f"{label}: values do not fit {datatype}", code=ErrorCode.WRONG_DATATYPE)
    if array.size != math.prod(shape):
        raise SchemaViolation(
            f"{label}: data holds {array.size} values but shape {shape} needs {math.prod(shape)}",
            code=ErrorCode.SHAPE_MISMATCH,
        )
    with np.errstate(over="ignore"):  # FP32 overflow becomes inf, which the guard rejects
        return name, array.astype(target, copy=False).reshape(shape)


def decode_infer_request(body: bytes) -> InferRequest:
    return decode_infer_document(parse_json(body))


def decode_infer_document(doc: Any) -> InferRequest:
    if not isinstance(doc, dict):
        raise BadRequest("request body must be a JSON object", code=ErrorCode.MALFORMED_REQUEST)
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest("'inputs' must be a non-empty list", code=ErrorCode.MALFORMED_REQUEST)
    if len(inputs) > _MAX_INPUTS:
        raise BadRequest(f"at most {_MAX_INPUTS} inputs per request", code=ErrorCode.MALFORMED_REQUEST)
    request_id = doc.get("id")
    if request_id is not None and (not isinstance(request_id, str) or len(request_id) > 256):
        raise BadRequest("'id' must be a string of at most 256 characters", code=ErrorCode.MALFORMED_REQUEST)
    parameters = doc.get("parameters", {})
    if not isinstance(parameters, dict):
        raise BadRequest("'parameters' must be an object", code=ErrorCode.MALFORMED_REQUEST)
    tensors: dict[str, np.ndarray] = {}
    for i, entry in enumerate(inputs):
        name, array = _tensor(entry, i)
        if name in tensors:
            raise BadRequest(f"input {name[:64]!r} appears twice", code=ErrorCode.MALFORMED_REQUEST)
        tensors[name] = array
    requested = _requested_outputs(doc.get("outputs"))
    rows = next(iter(tensors.values())).shape[0]
    if any(array.shape[0] != rows for array in tensors.values()):
        raise SchemaViolation("every input must have the same number of rows", code=ErrorCode.WRONG_SHAPE)
    return InferRequest(request_id, tensors, requested, parameters, rows)


def _requested_outputs(outputs: Any) -> list[str] | None:
    if outputs is None:
        return None
    if not isinstance(outputs, list) or not all(
        isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs
    ):
        raise BadRequest(
            "'outputs' must be a list of objects with a 'name'", code=ErrorCode.MALFORMED_REQUEST
        )
    for o in outputs:
        params = o.get("parameters") or {}
        if not isinstance(params, dict):
            raise BadRequest("outputs[].parameters must be an object", code=ErrorCode.MALFORMED_REQUEST)
        if params.get("binary_data"):
            raise BadRequest(
                "binary tensor data is not supported; use JSON data", code=ErrorCode.UNSUPPORTED_PARAMETER
            )
    return [o["name"] for o in outputs]


def encode_infer_response(
    *, model: str, version: str, request_id: str | None, outputs: list[dict[str, Any]]
) -> dict[str, Any]:
    response: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": outputs}
    if request_id is not None:
        response["id"] = request_id
    return response
