"""ModelInferRequest and ModelInferResponse to and from the core's request and answer. No policy here.

A request becomes the same `InferRequest` the JSON path makes: its inputs pass the JSON path's own
checks (`bastion.protocol`: entry, shape, datatype, count), whether their values come as typed
`contents` or as `raw_input_contents` (little-endian bytes, BYTES elements length-prefixed, as the
binary tensor extension's). So every encoding of a request is refused the same way: 400 for a
malformed message, 422 for values that do not fill their declared shape and datatype.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from bastion.context import InferRequest
from bastion.errors import BadRequest, ErrorCode, SchemaViolation
from bastion.grpc import grpc_predict_v2_pb2 as pb
from bastion.protocol import TensorHeader, decode_infer_document, numpy_dtype, tensor_from_values
from bastion.protocol_binary import tensor_bytes, tensor_from_bytes

# The typed field of InferTensorContents that carries each datatype (FP16 has none: raw only).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_ALL_FIELDS = tuple(sorted(set(CONTENTS_FIELD.values())))
_SOURCE = "_grpc_source"  # the key under which an input's entry carries its proto values


def parameters(params: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    """A parameters map as plain values; a parameter of a kind this protocol version lacks is dropped."""
    out: dict[str, Any] = {}
    for key, param in params.items():
        kind = param.WhichOneof("parameter_choice")
        if kind is not None:
            out[key] = getattr(param, kind)
    return out


def decode_model_infer(message: pb.ModelInferRequest) -> InferRequest:
    """The `InferRequest` of a parsed ModelInferRequest.

    Raises BadRequest (400 `malformed_request`, `malformed_binary`) and SchemaViolation (422) exactly
    where the JSON path would, plus 400 `malformed_binary` when `raw_input_contents` does not give
    one entry per input or an input has both raw and typed values.
    """
    raw = message.raw_input_contents
    if raw and len(raw) != len(message.inputs):
        raise BadRequest(
            f"raw_input_contents has {len(raw)} entries for {len(message.inputs)} inputs: give one per input",
            code=ErrorCode.MALFORMED_BINARY,
        )
    inputs: list[dict[str, Any]] = []
    for i, tensor in enumerate(message.inputs):
        if raw and tensor.HasField("contents"):
            raise BadRequest(
                f"input {tensor.name[:64]!r}: both contents and raw_input_contents",
                code=ErrorCode.MALFORMED_BINARY,
            )
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
            _SOURCE: raw[i] if raw else tensor.contents,
        }
        if tensor.parameters:
            entry["parameters"] = parameters(tensor.parameters)
        inputs.append(entry)
    doc: dict[str, Any] = {"inputs": inputs, "parameters": parameters(message.parameters)}
    if message.id:
        doc["id"] = message.id
    if message.outputs:
        doc["outputs"] = [{"name": o.name, "parameters": parameters(o.parameters)} for o in message.outputs]
    return decode_infer_document(doc, _read)


def _read(header: TensorHeader) -> np.ndarray:
    source = header.entry[_SOURCE]
    if isinstance(source, bytes):
        return tensor_from_bytes(header, source)
    numpy_dtype(header)  # an unsupported datatype is refused as the JSON path refuses it (422)
    wanted = CONTENTS_FIELD.get(header.datatype)
    for name in _ALL_FIELDS:
        if name != wanted and len(getattr(source, name)):
            raise SchemaViolation(
                f"{header.label}: contents.{name} does not hold {header.datatype} values"
                + ("" if wanted else f" ({header.datatype} is sent in raw_input_contents only)"),
                code=ErrorCode.WRONG_DATATYPE,
            )
    values = list(getattr(source, wanted)) if wanted else []
    return tensor_from_values(header, values)


def encode_model_infer(doc: dict[str, Any], *, raw: bool) -> pb.ModelInferResponse:
    """The ModelInferResponse of a V2 response document (model_name, model_version, id, outputs).

    `raw`: each output's values go in `raw_output_contents` (in output order; BYTES elements each
    after a 4-byte little-endian length), as Triton answers a client that sent raw inputs;
    otherwise in the output's typed `contents`.
    """
    response = pb.ModelInferResponse(
        model_name=doc.get("model_name", ""),
        model_version=doc.get("model_version", ""),
        id=doc.get("id") or "",
    )
    for output in doc.get("outputs", []):
        datatype = output["datatype"]
        tensor = response.outputs.add(name=output["name"], datatype=datatype, shape=output["shape"])
        data = output["data"]
        if raw:
            response.raw_output_contents.append(tensor_bytes(datatype, data))
            continue
        values = np.asarray(data, dtype=object if datatype == "BYTES" else None).ravel().tolist()
        if datatype == "BYTES":
            values = [v.encode() if isinstance(v, str) else bytes(v) for v in values]
        getattr(tensor.contents, CONTENTS_FIELD[datatype]).extend(values)
    return response


def encode_model_metadata(doc: dict[str, Any]) -> pb.ModelMetadataResponse:
    """The ModelMetadataResponse of the V2 metadata document (what this protocol's message can carry:
    the document's `parameters`, such as the caller's granted outputs, are REST-only)."""

    def tensors(entries: list[dict[str, Any]]) -> list[pb.ModelMetadataResponse.TensorMetadata]:
        return [
            pb.ModelMetadataResponse.TensorMetadata(name=e["name"], datatype=e["datatype"], shape=e["shape"])
            for e in entries
        ]

    return pb.ModelMetadataResponse(
        name=doc["name"],
        versions=doc.get("versions", []),
        platform=doc.get("platform", ""),
        inputs=tensors(doc.get("inputs", [])),
        outputs=tensors(doc.get("outputs", [])),
    )
