"""Open Inference Protocol V2 (KServe / MLServer / Triton) JSON codec. No policy here.

Decoding checks only that a request is well formed and that each tensor's data
fits the datatype and shape the request itself declares; whether it fits the
model is the input guard's job. A tensor with a zero dimension, or inputs with
different row counts, are refused here (422), before any stage spends anything.
The per-tensor checks (`tensor_header`, `tensor_from_values`, `check_count`) are shared with the
binary tensor extension (`bastion.protocol_binary`): every encoding of a tensor passes the same ones.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from bastion.context import BINARY_ALL, InferRequest
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


@dataclass(frozen=True, slots=True)
class TensorHeader:
    """One entry of a request's "inputs" whose name, datatype string and shape are well formed.

    Where its values come from is the transport's business: JSON `data` (`json_tensor`), the binary
    extension's raw bytes (`bastion.protocol_binary`), gRPC contents. Every source ends in the same
    checks of `tensor_from_values` or `tensor_from_bytes`.
    """

    name: str
    datatype: str
    shape: list[int]
    entry: dict[str, Any]
    parameters: dict[str, Any]

    @property
    def label(self) -> str:
        return f"input {self.name[:64]!r}"

    @property
    def count(self) -> int:
        """Elements the shape declares: the product of its dimensions."""
        return math.prod(self.shape)


TensorReader = Callable[[TensorHeader], np.ndarray]


def tensor_header(entry: Any, index: int) -> TensorHeader:
    """The checks every tensor passes, whatever carries its values. Raises BadRequest (400) for a
    malformed entry, SchemaViolation 422 `empty_tensor` for a zero dimension."""
    if not isinstance(entry, dict):
        raise BadRequest(f"inputs[{index}] must be an object", code=ErrorCode.MALFORMED_REQUEST)
    name, datatype, shape = entry.get("name"), entry.get("datatype"), entry.get("shape")
    if not isinstance(name, str) or not name:
        raise BadRequest(f"inputs[{index}].name must be a non-empty string", code=ErrorCode.MALFORMED_REQUEST)
    if not isinstance(datatype, str):
        raise BadRequest(f"input {name[:64]!r}: datatype must be a string", code=ErrorCode.MALFORMED_REQUEST)
    if isinstance(shape, list):
        shape = [integral(d) for d in shape]
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= _MAX_DIMS
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise BadRequest(
            f"input {name[:64]!r}: shape must be a list of 1 to {_MAX_DIMS} non-negative integers",
            code=ErrorCode.MALFORMED_REQUEST,
        )
    if 0 in shape:
        # Nothing to infer: no runtime, screen or privacy mechanism is defined on an empty batch.
        raise SchemaViolation(
            f"input {name[:64]!r}: shape {shape} has a zero dimension", code=ErrorCode.EMPTY_TENSOR
        )
    parameters = entry.get("parameters", {})
    if not isinstance(parameters, dict):
        raise BadRequest(
            f"input {name[:64]!r}: parameters must be an object", code=ErrorCode.MALFORMED_REQUEST
        )
    if "binary_data_size" in parameters and "data" in entry:
        # Two sources for one tensor: whichever a later reader trusted, the other would be unchecked.
        raise BadRequest(
            f"input {name[:64]!r}: has both data and binary_data_size", code=ErrorCode.MALFORMED_BINARY
        )
    return TensorHeader(name, datatype, shape, entry, parameters)


def integral(value: Any) -> Any:
    """An integral JSON float (60.0) as the int it is: JSON Schema's `integer` includes it, and so
    do clients that serialise numbers as doubles. Anything else is returned as it is."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _holds_boolean(data: Any) -> bool:
    """True if a JSON `true`/`false` sits anywhere in (nested) `data`."""
    if isinstance(data, list):
        return any(_holds_boolean(v) for v in data)
    return isinstance(data, bool)


def _exact_integers(header: TensorHeader, data: Any, target: np.dtype[np.generic]) -> np.ndarray:
    """Integers numpy could not hold in int64 (UINT64 above 2**63 - 1, or out of any range): checked
    one by one as Python ints, never rounded through float64. Raises SchemaViolation (422)."""
    flat = np.asarray(data, dtype=object).ravel()
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in flat):
        raise SchemaViolation(
            f"{header.label}: data does not hold {header.datatype} values", code=ErrorCode.WRONG_DATATYPE
        )
    info = np.iinfo(target)  # type: ignore[type-var]
    if any(v < info.min or v > info.max for v in flat):
        raise SchemaViolation(
            f"{header.label}: values do not fit {header.datatype}", code=ErrorCode.WRONG_DATATYPE
        )
    return np.array(flat.tolist(), dtype=target)


def numpy_dtype(header: TensorHeader) -> np.dtype[np.generic]:
    """The numpy dtype of a supported V2 datatype; SchemaViolation 422 `unsupported_datatype` otherwise
    (BYTES and BF16 among them: no served model takes strings, and numpy has no bfloat16)."""
    target = V2_TO_NUMPY.get(header.datatype)
    if target is None:
        raise SchemaViolation(
            f"{header.label}: datatype {header.datatype[:16]!r} is not supported",
            code=ErrorCode.UNSUPPORTED_DATATYPE,
        )
    return target


def _json_tensor_without_booleans(header: TensorHeader) -> np.ndarray:
    """`json_tensor`, refusing a JSON boolean among the values of a non-BOOL tensor: numpy would
    read `[true, 1]` as `[1, 1]`. Used only when the body holds a `true` or `false` at all."""
    if header.datatype != "BOOL" and _holds_boolean(header.entry.get("data")):
        raise SchemaViolation(
            f"{header.label}: data does not hold {header.datatype} values", code=ErrorCode.WRONG_DATATYPE
        )
    return json_tensor(header)


def json_reader(json_text: bytes) -> TensorReader:
    """The reader for the JSON-data inputs of a document parsed from `json_text`. Scanning every
    value for booleans costs; a document without the literals `true`/`false` cannot hold one."""
    if b"true" in json_text or b"false" in json_text:
        return _json_tensor_without_booleans
    return json_tensor


def json_tensor(header: TensorHeader) -> np.ndarray:
    """The tensor from the entry's JSON `data`."""
    data = header.entry.get("data")
    if data is None:
        if "binary_data_size" in header.parameters:
            raise BadRequest(
                f"{header.label}: binary_data_size needs the Inference-Header-Content-Length header "
                "(the length of the JSON part of a binary tensor request)",
                code=ErrorCode.BAD_HEADER_LENGTH,
            )
        raise BadRequest(f"{header.label}: data is missing", code=ErrorCode.MALFORMED_REQUEST)
    return tensor_from_values(header, data)


def tensor_from_values(header: TensorHeader, data: Any) -> np.ndarray:
    """A tensor from a (flat or nested) list of values: each must fit the declared datatype, and
    there must be exactly as many as the shape declares. Raises SchemaViolation (422)."""
    datatype, shape = header.datatype, header.shape
    target = numpy_dtype(header)
    try:
        array = np.asarray(data)
    except (ValueError, OverflowError):
        raise SchemaViolation(
            f"{header.label}: data is ragged or not numeric", code=ErrorCode.WRONG_DATATYPE
        ) from None
    if target.kind in "iu" and array.dtype.kind in "fO":
        # Integers past int64 make numpy infer float64 (rounded) or object: check them exactly.
        try:
            array = _exact_integers(header, data, target)
        except ValueError:
            raise SchemaViolation(
                f"{header.label}: data is ragged or not numeric", code=ErrorCode.WRONG_DATATYPE
            ) from None
    if array.dtype.kind not in _ACCEPTED_KINDS[target.kind]:
        raise SchemaViolation(
            f"{header.label}: data does not hold {datatype} values", code=ErrorCode.WRONG_DATATYPE
        )
    if target.kind in "iu" and array.size:
        info = np.iinfo(target)  # type: ignore[type-var]
        if array.min() < info.min or array.max() > info.max:
            raise SchemaViolation(
                f"{header.label}: values do not fit {datatype}", code=ErrorCode.WRONG_DATATYPE
            )
    check_count(header, array.size)
    with np.errstate(over="ignore"):  # FP32 overflow becomes inf, which the guard rejects
        return array.astype(target, copy=False).reshape(shape)


def check_count(header: TensorHeader, count: int) -> None:
    """SchemaViolation 422 `shape_mismatch` unless `count` values fill the declared shape."""
    if count != header.count:
        raise SchemaViolation(
            f"{header.label}: data holds {count} values but shape {header.shape} needs {header.count}",
            code=ErrorCode.SHAPE_MISMATCH,
        )


def decode_infer_request(body: bytes) -> InferRequest:
    """A V2 JSON request body to an InferRequest. Raises BadRequest (400), SchemaViolation (422)."""
    try:
        doc = parse_json(body)
    except BadRequest:
        # Say what is missing rather than "not JSON": a binary tensor body sent without its header.
        if b'"binary_data_size"' in body:
            raise BadRequest(
                "binary tensor data needs the Inference-Header-Content-Length header "
                "(the length of the JSON part of the body)",
                code=ErrorCode.BAD_HEADER_LENGTH,
            ) from None
        raise
    return decode_infer_document(doc, json_reader(body))


def decode_infer_document(doc: Any, read: TensorReader = json_tensor) -> InferRequest:
    """A V2 request document to an InferRequest. `read` turns each input's checked header into its
    tensor (JSON `data` by default; the binary extension passes its own). Raises BadRequest (400),
    SchemaViolation (422)."""
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
    for name in _UNHONOURED_PARAMETERS:
        if name in parameters:
            # Triton's and KServe's request parameters with a meaning this server does not give them:
            # accepted and ignored, a client would believe its timeout or priority held (red team #9 F15).
            raise BadRequest(f"parameters.{name} is not supported", code=ErrorCode.UNSUPPORTED_PARAMETER)
    tensors: dict[str, np.ndarray] = {}
    for i, entry in enumerate(inputs):
        header = tensor_header(entry, i)
        name, array = header.name, read(header)
        if name in tensors:
            raise BadRequest(f"input {name[:64]!r} appears twice", code=ErrorCode.MALFORMED_REQUEST)
        tensors[name] = array
    requested, binary_outputs = _requested_outputs(doc.get("outputs"), parameters)
    rows = next(iter(tensors.values())).shape[0]
    if any(array.shape[0] != rows for array in tensors.values()):
        raise SchemaViolation("every input must have the same number of rows", code=ErrorCode.WRONG_SHAPE)
    return InferRequest(request_id, tensors, requested, parameters, rows, binary_outputs)


# Request parameters other servers honour and this one does not (it has its own deadline, no priority
# queue, no sequence batching, no classification answer). Unknown vendor keys are left alone.
_UNHONOURED_PARAMETERS = (
    "timeout",
    "priority",
    "sequence_id",
    "sequence_start",
    "sequence_end",
    "classification",
)


def _requested_outputs(outputs: Any, parameters: dict[str, Any]) -> tuple[list[str] | None, frozenset[str]]:
    """The outputs asked for (None: every granted one) and those to answer as raw bytes: each output's
    `binary_data`, defaulting to the request's `binary_data_output` ("*" when no output is named)."""
    every_binary = parameters.get("binary_data_output", False)
    if not isinstance(every_binary, bool):
        raise BadRequest("parameters.binary_data_output must be a boolean", code=ErrorCode.MALFORMED_REQUEST)
    if outputs is None:
        return None, frozenset({BINARY_ALL} if every_binary else ())
    if not isinstance(outputs, list) or not all(
        isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs
    ):
        raise BadRequest(
            "'outputs' must be a list of objects with a 'name'", code=ErrorCode.MALFORMED_REQUEST
        )
    binary = set()
    for o in outputs:
        params = o.get("parameters") or {}
        if not isinstance(params, dict):
            raise BadRequest("outputs[].parameters must be an object", code=ErrorCode.MALFORMED_REQUEST)
        if "classification" in params:  # Triton's top-k-as-strings: an answer this server does not give
            raise BadRequest(
                "outputs[].parameters.classification is not supported", code=ErrorCode.UNSUPPORTED_PARAMETER
            )
        wanted = params.get("binary_data", every_binary)
        if not isinstance(wanted, bool):
            raise BadRequest(
                "outputs[].parameters.binary_data must be a boolean", code=ErrorCode.MALFORMED_REQUEST
            )
        if wanted:
            binary.add(o["name"])
    return [o["name"] for o in outputs], frozenset(binary)


def encode_infer_response(
    *, model: str, version: str, request_id: str | None, outputs: list[dict[str, Any]]
) -> dict[str, Any]:
    response: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": outputs}
    if request_id is not None:
        response["id"] = request_id
    return response
