"""The binary tensor extension's codec: whatever arrives, a request or a 4xx BastionError; valid tensors
round-trip, and both encodings of one request decode to the same tensors."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bastion.context import BINARY_ALL, InferRequest
from bastion.errors import BadRequest, BastionError
from bastion.manifest import V2_TO_NUMPY
from bastion.protocol import decode_infer_request
from bastion.protocol_binary import decoder, encode_response, tensor_bytes


def binary_body(
    tensors: dict[str, tuple[str, np.ndarray | bytes, list[int]]], **doc: Any
) -> tuple[bytes, bytes]:
    """(Inference-Header-Content-Length value, body) as tritonclient frames it: (datatype, raw, shape)."""
    inputs, raws = [], []
    for name, (datatype, raw, shape) in tensors.items():
        data = raw if isinstance(raw, bytes) else raw.astype(raw.dtype.newbyteorder("<")).tobytes()
        inputs.append(
            {
                "name": name,
                "datatype": datatype,
                "shape": shape,
                "parameters": {"binary_data_size": len(data)},
            }
        )
        raws.append(data)
    header = json.dumps({"inputs": inputs, **doc}).encode()
    return str(len(header)).encode(), header + b"".join(raws)


def decode(length: bytes, body: bytes) -> InferRequest:
    return decoder(length)(body)


def status_of(length: bytes, body: bytes) -> tuple[int, InferRequest | None]:
    """(200, the request) when the body decodes, (the error's status, None) when it is refused; any
    other exception propagates."""
    try:
        return 200, decode(length, body)
    except BastionError as e:
        return e.status, None


def refused(length: bytes, body: bytes) -> BastionError:
    with pytest.raises(BastionError) as err:
        decode(length, body)
    assert 400 <= err.value.status < 500
    return err.value


GOOD = np.arange(6, dtype=np.float32).reshape(2, 3)


def good() -> tuple[bytes, bytes]:
    return binary_body({"x": ("FP32", GOOD, [2, 3])})


def test_a_binary_request_decodes_to_the_json_paths_request() -> None:
    length, body = binary_body(
        {"x": ("FP32", GOOD, [2, 3]), "c": ("INT64", np.array([[1], [0]], dtype=np.int64), [2, 1])},
        id="r-7",
        outputs=[{"name": "label", "parameters": {"binary_data": True}}],
    )
    got = decode(length, body)
    as_json = decode_infer_request(
        json.dumps(
            {
                "id": "r-7",
                "inputs": [
                    {"name": "x", "datatype": "FP32", "shape": [2, 3], "data": GOOD.ravel().tolist()},
                    {"name": "c", "datatype": "INT64", "shape": [2, 1], "data": [1, 0]},
                ],
                "outputs": [{"name": "label", "parameters": {"binary_data": True}}],
            }
        ).encode()
    )
    assert got.id == as_json.id == "r-7" and got.rows == as_json.rows == 2
    assert got.requested_outputs == as_json.requested_outputs == ["label"]
    assert got.binary_outputs == as_json.binary_outputs == frozenset({"label"})
    for name in ("x", "c"):
        assert got.inputs[name].dtype == as_json.inputs[name].dtype
        assert np.array_equal(got.inputs[name], as_json.inputs[name])
        assert got.inputs[name].flags.writeable and got.inputs[name].flags.aligned


def test_tritonclients_own_framing_decodes() -> None:
    from tritonclient.http import InferInput, InferRequestedOutput
    from tritonclient.http._utils import _get_inference_request

    x = np.random.default_rng(0).normal(size=(4, 30)).astype(np.float32)
    tensor = InferInput("features", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)  # binary_data=True, the default
    body, json_size = _get_inference_request(
        [tensor], "req-1", [InferRequestedOutput("label")], 0, False, False, 0, None, None
    )
    assert json_size is not None
    request = decode(str(json_size).encode(), body)
    assert request.id == "req-1" and request.binary_outputs == frozenset({"label"})
    assert np.array_equal(request.inputs["features"], x)


_DTYPES = [d for d in V2_TO_NUMPY if d != "BOOL"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_valid_tensors_of_every_datatype_round_trip(data: st.DataObject) -> None:
    datatype = data.draw(st.sampled_from([*_DTYPES, "BOOL"]))
    dtype = V2_TO_NUMPY[datatype]
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=5))
    array = data.draw(hnp.arrays(dtype, shape))
    length, body = binary_body({"t": (datatype, array, list(shape))})
    got = decode(length, body).inputs["t"]
    assert got.dtype == dtype and got.shape == shape
    assert got.tobytes() == array.tobytes()  # bit for bit: NaN payloads, -0.0, subnormals
    # The encoder writes what the decoder reads: an answer's tensors in the same framing.
    assert tensor_bytes(datatype, array.tolist()) == array.astype(dtype.newbyteorder("<")).tobytes()


def _bytes_tensor(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


@pytest.mark.parametrize(
    ("name", "length", "body", "status", "code"),
    [
        ("no digits", b"", None, 400, "bad_header_length"),
        ("negative", b"-5", None, 400, "bad_header_length"),
        ("signed", b"+5", None, 400, "bad_header_length"),
        ("not a number", b"abc", None, 400, "bad_header_length"),
        ("hex", b"0x10", None, 400, "bad_header_length"),
        ("spaces", b" 12", None, 400, "bad_header_length"),
        ("unicode digits", "١٢".encode(), None, 400, "bad_header_length"),
        ("zero", b"0", None, 400, "bad_header_length"),
        ("longer than the body", b"100000", None, 400, "bad_header_length"),
        ("huge", b"9" * 400, None, 400, "bad_header_length"),
        ("header cuts the JSON", b"10", None, 400, "malformed_json"),
    ],
)
def test_bad_header_lengths(name: str, length: bytes, body: bytes | None, status: int, code: str) -> None:
    body = body if body is not None else good()[1]
    err = refused(length, body)
    assert (err.status, err.code) == (status, code), name


def _framed(header: dict[str, Any], raw: bytes) -> tuple[bytes, bytes]:
    text = json.dumps(header).encode()
    return str(len(text)).encode(), text + raw


def _input(size: Any, datatype: str = "FP32", shape: list[int] | None = None, **extra: Any) -> dict:
    entry = {"name": "x", "datatype": datatype, "shape": shape or [2, 3], **extra}
    if size is not None:
        entry["parameters"] = {"binary_data_size": size}
    return entry


RAW = GOOD.tobytes()  # 24 bytes


@pytest.mark.parametrize(
    ("name", "header", "raw", "status", "code"),
    [
        ("size overruns the body", {"inputs": [_input(48)]}, RAW, 400, "malformed_binary"),
        ("trailing bytes", {"inputs": [_input(24)]}, RAW + b"\0" * 4, 400, "malformed_binary"),
        ("trailing bytes, no binary input", {"inputs": [_input(None, data=[0] * 6)]}, b"\0", 400,
         "malformed_binary"),
        ("size not the shape's", {"inputs": [_input(20)]}, RAW[:20], 422, "shape_mismatch"),
        ("size too small for FP64", {"inputs": [_input(24, "FP64")]}, RAW, 422, "shape_mismatch"),
        ("negative size", {"inputs": [_input(-1)]}, RAW, 400, "malformed_binary"),
        ("size a string", {"inputs": [_input("24")]}, RAW, 400, "malformed_binary"),
        ("size a float", {"inputs": [_input(24.0)]}, RAW, 400, "malformed_binary"),
        ("size a boolean", {"inputs": [_input(True)]}, RAW, 400, "malformed_binary"),
        ("data and binary both", {"inputs": [_input(24, data=[0] * 6)]}, RAW, 400, "malformed_binary"),
        ("neither data nor binary", {"inputs": [_input(None)]}, b"", 400, "malformed_request"),
        ("parameters not an object", {"inputs": [_input(None, parameters=[24])]}, RAW, 400,
         "malformed_request"),
        ("BYTES element overruns", {"inputs": [_input(8, "BYTES", [1])]}, struct.pack("<I", 99) + b"abcd",
         400, "malformed_binary"),
        ("BYTES prefix cut short", {"inputs": [_input(6, "BYTES", [2])]}, _bytes_tensor([b"a"]) + b"\0",
         400, "malformed_binary"),
        ("BYTES count not the shape's", {"inputs": [_input(5, "BYTES", [2])]}, _bytes_tensor([b"a"]), 422,
         "shape_mismatch"),
        ("BYTES well framed", {"inputs": [_input(10, "BYTES", [2])]}, _bytes_tensor([b"a", b"b"]), 422,
         "unsupported_datatype"),
        ("BF16", {"inputs": [_input(12, "BF16")]}, RAW[:12], 422, "unsupported_datatype"),
        ("BOOL byte 2", {"inputs": [_input(6, "BOOL")]}, b"\0\1\2\0\1\0", 422, "wrong_datatype"),
        ("zero dimension", {"inputs": [_input(0, shape=[0, 3])]}, b"", 422, "empty_tensor"),
        ("negative dimension", {"inputs": [_input(24, shape=[-2, -3])]}, RAW, 400, "malformed_request"),
        ("nine dimensions", {"inputs": [_input(4, shape=[1] * 9)]}, RAW[:4], 400, "malformed_request"),
        ("rows differ", {"inputs": [_input(24), {**_input(12, shape=[1, 3]), "name": "y"}]}, RAW + RAW[:12],
         422, "wrong_shape"),
        ("duplicate input", {"inputs": [_input(24), _input(24)]}, RAW * 2, 400, "malformed_request"),
        ("65 inputs", {"inputs": [{**_input(4, shape=[1]), "name": f"i{i}"} for i in range(65)]},
         RAW[:4] * 65, 400, "malformed_request"),
        ("no inputs", {"inputs": []}, b"", 400, "malformed_request"),
        ("id not a string", {"inputs": [_input(24)], "id": 5}, RAW, 400, "malformed_request"),
        ("binary_data_output not a boolean", {"inputs": [_input(24)], "parameters": {"binary_data_output": 1}},
         RAW, 400, "malformed_request"),
        ("binary_data not a boolean",
         {"inputs": [_input(24)], "outputs": [{"name": "label", "parameters": {"binary_data": "yes"}}]},
         RAW, 400, "malformed_request"),
        ("classification", {"inputs": [_input(24)],
                            "outputs": [{"name": "label", "parameters": {"classification": 2}}]},
         RAW, 400, "unsupported_parameter"),
        ("header not an object", [1, 2], b"", 400, "malformed_request"),
    ],
)  # fmt: skip
def test_malformed_framing_is_refused_precisely(
    name: str, header: Any, raw: bytes, status: int, code: str
) -> None:
    err = refused(*_framed(header, raw))
    assert (err.status, err.code) == (status, code), f"{name}: {err.code} {err.message}"


def test_bytes_are_read_as_the_declared_datatype() -> None:
    # 48 bytes are 12 FP32 values or 6 FP64 ones: read as declared (FP64 [2, 3]), and the guard
    # then refuses the datatype if the model takes FP32: a size never makes the decoder guess one.
    request = decode(*_framed({"inputs": [_input(48, "FP64")]}, RAW * 2))
    assert request.inputs["x"].dtype == np.float64


def test_a_binary_body_without_its_header_is_told_so() -> None:
    _, body = good()
    with pytest.raises(BadRequest) as err:
        decode_infer_request(body)  # the old answer: 400 "request body is not valid JSON"
    assert err.value.code == "bad_header_length" and "Inference-Header-Content-Length" in err.value.message
    # Valid JSON naming a binary size, but no header: the same precise refusal.
    with pytest.raises(BadRequest) as err:
        decode_infer_request(json.dumps({"inputs": [_input(24)]}).encode())
    assert err.value.code == "bad_header_length"


def test_json_and_binary_inputs_mix() -> None:
    header = {"inputs": [_input(24), {"name": "y", "datatype": "INT64", "shape": [2, 1], "data": [3, 4]}]}
    request = decode(*_framed(header, RAW))
    assert np.array_equal(request.inputs["x"], GOOD) and request.inputs["y"].ravel().tolist() == [3, 4]


def test_binary_outputs_follow_the_request_and_each_output() -> None:
    def outputs(doc: dict[str, Any]) -> frozenset[str]:
        return decode(*_framed({"inputs": [_input(24)], **doc}, RAW)).binary_outputs

    assert outputs({}) == frozenset()
    assert outputs({"parameters": {"binary_data_output": True}}) == {BINARY_ALL}
    assert outputs({"outputs": [{"name": "label"}, {"name": "p", "parameters": {"binary_data": True}}]}) == {
        "p"
    }
    both = {"parameters": {"binary_data_output": True}}
    named = [{"name": "label"}, {"name": "p", "parameters": {"binary_data": False}}]
    assert outputs({**both, "outputs": named}) == {"label"}  # an output's own setting wins


# -- whatever arrives ------------------------------------------------------------------------------


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(length=st.binary(max_size=24) | st.integers(-(10**30), 10**30).map(lambda n: str(n).encode()),
       body=st.binary(max_size=400))  # fmt: skip
@pytest.mark.slow
def test_arbitrary_framing_gives_a_request_or_a_4xx(length: bytes, body: bytes) -> None:
    status, _ = status_of(length, body)
    assert status == 200 or 400 <= status < 500


_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.integers(-3, 300), max_size=10),
)


@st.composite
def mutated(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A valid request, then header fields replaced, sizes moved, bytes cut, flipped or added."""
    header: dict[str, Any] = {"inputs": [_input(24), {**_input(8, "INT64", [2, 1]), "name": "y"}]}
    raw = RAW + np.array([1, 2], dtype=np.int64).tobytes()[:8] + b"\0" * 8
    header["inputs"][1]["parameters"]["binary_data_size"] = 16
    for _ in range(draw(st.integers(0, 3))):
        entry = header["inputs"][draw(st.integers(0, 1))]
        field = draw(st.sampled_from(["name", "datatype", "shape", "data", "parameters", "binary_data_size"]))
        value = draw(_VALUES | st.sampled_from(["FP64", "BYTES", "BOOL", "UINT8", [2, 3], [4, 3], [1, 1]]))
        if field == "binary_data_size":
            entry.setdefault("parameters", {})
            if isinstance(entry["parameters"], dict):
                entry["parameters"][field] = value
        else:
            entry[field] = value
    text = json.dumps(header).encode()
    body = bytearray(text + raw)
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["flip", "cut", "add"]))
        if op == "flip" and body:
            body[draw(st.integers(0, len(body) - 1))] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut" and body:
            del body[draw(st.integers(0, len(body) - 1)) :]
        else:
            body += draw(st.binary(min_size=1, max_size=16))
    length = len(text) + draw(st.sampled_from([0, 0, 0, -1, 1, -5, 7]))
    return str(length).encode(), bytes(body)


@pytest.mark.slow
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_requests_give_a_request_or_a_4xx(framed: tuple[bytes, bytes]) -> None:
    status, request = status_of(*framed)
    assert status == 200 or 400 <= status < 500
    if request is not None:  # accepted: every tensor fills its declared shape
        for array in request.inputs.values():
            assert array.size == int(np.prod(array.shape)) and array.shape[0] == request.rows


# -- the answer ------------------------------------------------------------------------------------


def _answer(outputs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"model_name": "m", "model_version": "1", "id": "r-1", "outputs": outputs}


LABEL = {"name": "label", "datatype": "BYTES", "shape": [3], "data": ["benign", "malignant", "é"]}
PROBA = {"name": "probabilities", "datatype": "FP32", "shape": [3, 2], "data": [0.25, 0.75] * 3}
VALUE = {"name": "value", "datatype": "FP64", "shape": [3], "data": [1.5, -2.25, 1e300]}


@pytest.mark.parametrize(
    "binary",
    [frozenset({BINARY_ALL}), frozenset({"label"}), frozenset({"probabilities", "value"}), frozenset({"x"})],
)
def test_answers_decode_with_tritonclient(binary: frozenset[str]) -> None:
    from tritonclient.http import InferResult

    body, length = encode_response(_answer([LABEL, PROBA, VALUE]), binary)
    every = BINARY_ALL in binary
    if not (every or binary & {"label", "probabilities", "value"}):
        assert length is None and json.loads(body)["outputs"] == [LABEL, PROBA, VALUE]
        return
    assert length is not None
    result = InferResult.from_response_body(body, header_length=length)
    header = json.loads(body[:length])
    assert header["id"] == "r-1"
    for output in (LABEL, PROBA, VALUE):
        sent_binary = every or output["name"] in binary
        entry = next(o for o in header["outputs"] if o["name"] == output["name"])
        assert ("data" in entry) is not sent_binary and ("parameters" in entry) is sent_binary
        got = result.as_numpy(output["name"])
        if output["datatype"] == "BYTES":
            want = [s.encode() for s in output["data"]] if sent_binary else output["data"]
            assert list(got.ravel()) == want
        else:
            assert np.allclose(got.ravel(), output["data"])
