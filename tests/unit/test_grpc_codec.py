"""The gRPC codec (bastion.grpc.codec) in process: a ModelInferRequest decodes to the JSON path's own
InferRequest, and any message, however built, gives a request or a 4xx BastionError, never another
exception (the e2e tests drive it through a server; this tier had no test of it)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bastion.errors import BastionError
from bastion.grpc import grpc_predict_v2_pb2 as pb
from bastion.grpc.codec import decode_model_infer, encode_model_infer
from bastion.manifest import V2_TO_NUMPY
from bastion.protocol import decode_infer_request

DATATYPES = [*V2_TO_NUMPY, "BYTES", "BF16", "", "fp32", "FP32 "]
FIELDS = {
    "bool_contents": st.booleans(),
    "int_contents": st.integers(-(2**31), 2**31 - 1),
    "int64_contents": st.integers(-(2**63), 2**63 - 1),
    "uint_contents": st.integers(0, 2**32 - 1),
    "uint64_contents": st.integers(0, 2**64 - 1),
    "fp32_contents": st.floats(width=32),
    "fp64_contents": st.floats(),
    "bytes_contents": st.binary(max_size=6),
}


def test_a_message_decodes_to_the_json_paths_request_raw_or_typed() -> None:
    rows = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
    json_doc = {
        "id": "r",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3], "data": rows.ravel().tolist()}],
    }
    want = decode_infer_request(json.dumps(json_doc).encode())  # the JSON path's own request
    for raw in (True, False):
        message = pb.ModelInferRequest(model_name="m", id="r")
        tensor = message.inputs.add(name="x", datatype="FP32", shape=[2, 3])
        if raw:
            message.raw_input_contents.append(rows.astype("<f4").tobytes())
        else:
            tensor.contents.fp32_contents.extend(rows.ravel().tolist())
        got = decode_model_infer(message)
        assert got.id == want.id == "r" and got.rows == want.rows
        assert np.array_equal(got.inputs["x"], want.inputs["x"]) and got.inputs["x"].dtype == np.float32


@st.composite
def messages(draw: st.DrawFn) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name="m")
    raw = draw(st.booleans())
    for _ in range(draw(st.integers(0, 3))):
        datatype = draw(st.sampled_from(DATATYPES))
        dims = st.sampled_from([0, 1, 2, 3, -1, 2**31, 2**62])
        tensor = message.inputs.add(
            name=draw(st.sampled_from(["a", "b", ""])),
            datatype=datatype,
            shape=draw(st.lists(dims, max_size=9)),
        )
        if draw(st.booleans()):
            tensor.parameters["binary_data_size"].int64_param = draw(st.integers(0, 64))
        if raw:
            if datatype in V2_TO_NUMPY and draw(st.booleans()):
                values = np.zeros(draw(st.integers(0, 6)), V2_TO_NUMPY[datatype])
                message.raw_input_contents.append(values.tobytes())
            elif draw(st.booleans()):
                sizes = draw(st.lists(st.sampled_from([0, 1, 2, 2**32 - 1]), max_size=4))
                message.raw_input_contents.append(b"".join(struct.pack("<I", n) + b"x" for n in sizes))
            else:
                message.raw_input_contents.append(draw(st.binary(max_size=24)))
        else:
            for name in draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=2, unique=True)):
                getattr(tensor.contents, name).extend(draw(st.lists(FIELDS[name], max_size=6)))
    if draw(st.booleans()):
        output = message.outputs.add(name=draw(st.sampled_from(["y", ""])))
        if draw(st.booleans()):
            output.parameters["binary_data"].string_param = "yes"
    if draw(st.booleans()):
        message.parameters["binary_data_output"].int64_param = 1
    if draw(st.booleans()):
        message.id = "i" * draw(st.sampled_from([1, 300]))
    return message


@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages())
def test_any_message_gives_a_request_or_a_4xx(message: pb.ModelInferRequest) -> None:
    try:
        request = decode_model_infer(message)
    except BastionError as e:
        status = e.status
    else:
        status = 200
    assert status == 200 or 400 <= status < 500
    if status != 200:
        return
    answer = {
        "model_name": "m",
        "model_version": "1",
        "outputs": [{"name": n, "datatype": "FP64", "shape": [request.rows], "data": [0.5] * request.rows}
                    for n in ("v",)],
    }  # fmt: skip
    for raw in (True, False):
        encode_model_infer(answer, raw=raw).SerializeToString()
