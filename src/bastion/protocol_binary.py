"""The V2 binary tensor data extension (Triton's `binary_tensor_data`), on top of the JSON codec.

A request body is a JSON header of `Inference-Header-Content-Length` bytes, then the raw bytes of
each input whose entry carries `"parameters": {"binary_data_size": N}` (and no `data`), in input
order, nothing after the last. Numbers are little-endian; a BYTES element is a 4-byte little-endian
length and its bytes. Decoding ends in the JSON path's own checks (`bastion.protocol`), so both
encodings of one request give the same `InferRequest` or the same refusal; framing faults are 400
(`bad_header_length`, `malformed_binary`), a size that does not fill the shape 422 `shape_mismatch`.

An answer is encoded the same way when the request asked for it (`binary_data` on an output, or
`binary_data_output` on the request): its JSON header, then each binary output's bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson

from bastion.context import BINARY_ALL, InferRequest
from bastion.errors import BadRequest, ErrorCode, SchemaViolation
from bastion.manifest import V2_TO_NUMPY
from bastion.protocol import (
    TensorHeader,
    TensorReader,
    check_count,
    decode_infer_document,
    json_reader,
    numpy_dtype,
    parse_json,
)

HEADER_LENGTH = "Inference-Header-Content-Length"
_PREFIX = struct.Struct("<I")
_MAX_DIGITS = 20  # more than any body the cap allows; bounds the int() of an attacker's string


def decoder(header_length: bytes) -> Callable[[bytes], InferRequest]:
    """The decoder for a body sent with `Inference-Header-Content-Length: <header_length>`.

    The header's value is checked when the body is decoded (after identity and authorization), so a
    bad one is refused and audited like any other malformed body.
    """

    def decode(body: bytes) -> InferRequest:
        length = parse_header_length(header_length, len(body))
        doc = parse_json(body[:length])
        payload = _Payload(memoryview(body)[length:], json_reader(body[:length]))
        request = decode_infer_document(doc, payload.read)
        payload.finish()
        return request

    return decode


def parse_header_length(raw: bytes, body_size: int) -> int:
    """The JSON header's length in bytes: 1 to `body_size`. BadRequest 400 `bad_header_length` for
    anything else (empty, signed, not decimal digits, zero, longer than the body)."""
    if not raw.isdigit() or len(raw) > _MAX_DIGITS:  # bytes.isdigit: ASCII 0-9 only, no sign or space
        raise BadRequest(
            f"{HEADER_LENGTH} must be a decimal number of bytes", code=ErrorCode.BAD_HEADER_LENGTH
        )
    length = int(raw)
    if not 0 < length <= body_size:
        raise BadRequest(
            f"{HEADER_LENGTH} is {length} but the body holds {body_size} bytes: the JSON header must be "
            "1 byte or more and fit in the body",
            code=ErrorCode.BAD_HEADER_LENGTH,
        )
    return length


class _Payload:
    """The bytes after the JSON header, handed out to the binary inputs in their order."""

    def __init__(self, raw: memoryview, json_read: TensorReader) -> None:
        self._raw = raw
        self._at = 0
        self._json_read = json_read

    def read(self, header: TensorHeader) -> np.ndarray:
        if "binary_data_size" not in header.parameters:  # JSON and binary inputs may mix in one request
            return self._json_read(header)
        size = header.parameters["binary_data_size"]  # null included: a bad size, not a JSON input
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BadRequest(
                f"{header.label}: binary_data_size must be a non-negative integer",
                code=ErrorCode.MALFORMED_BINARY,
            )
        left = len(self._raw) - self._at
        if size > left:
            raise BadRequest(
                f"{header.label}: binary_data_size {size} overruns the body ({left} bytes left)",
                code=ErrorCode.MALFORMED_BINARY,
            )
        chunk = self._raw[self._at : self._at + size]
        self._at += size
        return tensor_from_bytes(header, chunk)

    def finish(self) -> None:
        left = len(self._raw) - self._at
        if left:  # bytes no input claims: a framing error, or data smuggled past every check
            raise BadRequest(
                f"{left} bytes after the last binary input: the binary_data_size values must add up "
                "to the body after the JSON header",
                code=ErrorCode.MALFORMED_BINARY,
            )


def tensor_from_bytes(header: TensorHeader, raw: bytes | memoryview) -> np.ndarray:
    """A tensor from its raw little-endian bytes (BYTES: length-prefixed elements).

    Raises BadRequest 400 `malformed_binary` (a BYTES element overruns), SchemaViolation 422
    (`shape_mismatch`: the size is not the shape's element count times the item size;
    `unsupported_datatype`; `wrong_datatype`: a BOOL byte other than 0 or 1).
    """
    if header.datatype == "BYTES":
        # Framing first, as JSON checks `data` is there before its datatype: then refused like JSON.
        check_count(header, len(split_bytes_elements(header, raw)))
    target = numpy_dtype(header)
    if len(raw) != header.count * target.itemsize:
        raise SchemaViolation(
            f"{header.label}: binary_data_size {len(raw)} but shape {header.shape} of {header.datatype} "
            f"needs {header.count} x {target.itemsize} bytes",
            code=ErrorCode.SHAPE_MISMATCH,
        )
    if target.kind == "b" and (np.frombuffer(raw, dtype=np.uint8) > 1).any():
        raise SchemaViolation(f"{header.label}: BOOL bytes must be 0 or 1", code=ErrorCode.WRONG_DATATYPE)
    # astype copies into native order and alignment: the runtime gets an ordinary, writable array.
    return np.frombuffer(raw, dtype=target.newbyteorder("<")).astype(target).reshape(header.shape)


def split_bytes_elements(header: TensorHeader, raw: bytes | memoryview) -> list[bytes]:
    """BYTES elements: each a 4-byte little-endian length, then that many bytes. BadRequest 400
    `malformed_binary` when a length prefix or an element runs past the end."""
    elements: list[bytes] = []
    at, end = 0, len(raw)
    while at < end:
        if end - at < _PREFIX.size:
            raise BadRequest(
                f"{header.label}: a BYTES length prefix is cut short", code=ErrorCode.MALFORMED_BINARY
            )
        (size,) = _PREFIX.unpack_from(raw, at)
        at += _PREFIX.size
        if size > end - at:
            raise BadRequest(
                f"{header.label}: a BYTES element of {size} bytes overruns its tensor ({end - at} left)",
                code=ErrorCode.MALFORMED_BINARY,
            )
        elements.append(bytes(raw[at : at + size]))
        at += size
    return elements


def encode_response(doc: dict[str, Any], binary: frozenset[str]) -> tuple[bytes, int | None]:
    """The body of an answer: (bytes, JSON header length), or (JSON, None) when no output is binary.

    `doc` is the V2 response document (`outputs`: name, datatype, shape, data); an output named in
    `binary` (or every output, with BINARY_ALL) loses its `data` for `parameters.binary_data_size`
    and its bytes follow the JSON header, in output order.
    """
    outputs = doc.get("outputs")
    if not binary or not isinstance(outputs, list):
        return orjson.dumps(doc), None
    every = BINARY_ALL in binary
    chunks: list[bytes] = []
    encoded: list[dict[str, Any]] = []
    for output in outputs:
        if every or output["name"] in binary:
            raw = tensor_bytes(output["datatype"], output["data"])
            output = {k: v for k, v in output.items() if k != "data"}
            output["parameters"] = {**output.get("parameters", {}), "binary_data_size": len(raw)}
            chunks.append(raw)
        encoded.append(output)
    if not chunks:
        return orjson.dumps(doc), None
    header = orjson.dumps({**doc, "outputs": encoded})
    return header + b"".join(chunks), len(header)


def tensor_bytes(datatype: str, data: Any) -> bytes:
    """Values (a flat or nested list) as the extension's raw bytes: little-endian numbers, or BYTES
    elements (str as UTF-8) each after its 4-byte little-endian length."""
    if datatype == "BYTES":
        parts: list[bytes] = []
        for value in np.asarray(data, dtype=object).ravel():
            element = value.encode() if isinstance(value, str) else bytes(value)
            parts += (_PREFIX.pack(len(element)), element)
        return b"".join(parts)
    return np.asarray(data, dtype=V2_TO_NUMPY[datatype].newbyteorder("<")).tobytes()
