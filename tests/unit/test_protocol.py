"""The V2 codec and the input guard never fail with anything but a BastionError (a 4xx), whatever arrives."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bastion.config import Action, OutputDetail
from bastion.context import RequestContext
from bastion.errors import BastionError, SchemaViolation
from bastion.manifest import InputSpec, Manifest, OutputSpec
from bastion.policy import EffectiveGrant
from bastion.protocol import decode_infer_request
from bastion.registry import ServedModel
from bastion.stages.input_guard import GuardInput

SPEC = InputSpec(name="x", datatype="FP32", shape=[-1, 3], min=[0.0, -1.0, 0.0], max=[1.0, 1.0, 10.0])
CAT = InputSpec(name="c", datatype="INT64", shape=[-1, 1], categories=[0, 1], sensitive=True)
MANIFEST = Manifest(
    name="m",
    version="1",
    runtime="onnx",
    file="m.onnx",
    inputs=[SPEC, CAT],
    outputs=OutputSpec(classes=["a", "b"]),
)
MODEL = ServedModel(MANIFEST, runtime=None, digest="sha256:0")  # type: ignore[arg-type]
GRANT = EffectiveGrant(frozenset({Action.INFER}), OutputDetail.LABEL, sensitive_inputs=True)


def _guard(body: bytes, grant: EffectiveGrant = GRANT) -> RequestContext:
    async def read(limit: int) -> bytes:
        return body

    ctx = RequestContext("r", Action.INFER, 0.0, None, read, model=MODEL, grant=grant)
    ctx.request = decode_infer_request(body)
    asyncio.run(GuardInput(max_rows=10, hmac_key=b"k" * 32)(ctx))
    return ctx


def _body(x: object, c: object = None, xshape: list[int] | None = None) -> bytes:
    inputs = [{"name": "x", "shape": xshape or [1, 3], "datatype": "FP32", "data": x}]
    inputs.append({"name": "c", "shape": [1, 1], "datatype": "INT64", "data": c if c is not None else [1]})
    return json.dumps({"inputs": inputs}).encode()


def test_valid_request_passes_and_is_fingerprinted() -> None:
    a = _guard(_body([0.5, 0.0, 3.0]))
    b = _guard(json.dumps(json.loads(_body([0.5, 0.0, 3.0]))).encode())  # re-encoded, same tensors
    assert a.payload_hmac == b.payload_hmac and len(a.payload_hmac or "") == 64
    assert _guard(_body([0.5, 0.0, 3.5])).payload_hmac != a.payload_hmac


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (_body([0.5, 0.0, 11.0]), "out_of_range"),
        (_body([0.5, -2.0, 1.0]), "out_of_range"),
        (_body([0.5, 0.0, 1.0], c=[2]), "not_a_category"),
        (_body([0.5, 0.0, 1.0], c=[1.5]), "wrong_datatype"),  # a float is not an INT64
        (_body([0.5, 0.0, 1.0], c=[2**70]), "wrong_datatype"),
        (_body([0.5, 0.0, 1.0, 1.0], xshape=[1, 4]), "wrong_shape"),
        (_body([True, False, True]), "wrong_datatype"),
    ],
)
def test_schema_violations(body: bytes, code: str) -> None:
    with pytest.raises(SchemaViolation) as err:
        _guard(body)
    assert err.value.code == code


def test_out_of_range_names_the_column_not_the_value() -> None:
    with pytest.raises(SchemaViolation) as err:
        _guard(_body([0.5, 0.0, 12.345]))
    assert "column 2" in err.value.message and "12.345" not in err.value.message


def test_sensitive_input_without_grant() -> None:
    from bastion.errors import PermissionDenied

    with pytest.raises(PermissionDenied):
        _guard(_body([0.5, 0.0, 3.0]), EffectiveGrant(frozenset({Action.INFER}), OutputDetail.LABEL, False))


def _status_of(body: bytes) -> int:
    """200 when the guard admits the body, the error's status when it refuses it; anything else propagates."""
    try:
        _guard(body)
    except BastionError as e:
        return e.status
    return 200


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(["x", "c", "", "zz"]),
    datatype=st.sampled_from(["FP32", "INT64", "BOOL", "BYTES", "FP16", "UINT8", "nope"]),
    shape=st.one_of(st.lists(st.integers(-2, 40), max_size=4), json_values),
    data=json_values,
    extra=json_values,
)
def test_fuzzed_requests_only_raise_client_errors(
    name: str, datatype: str, shape: object, data: object, extra: object
) -> None:
    doc = {
        "inputs": [{"name": name, "datatype": datatype, "shape": shape, "data": data}],
        "parameters": extra,
    }
    assert _status_of(json.dumps(doc).encode()) in range(200, 500)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_fuzzed_bytes_only_raise_client_errors(raw: bytes) -> None:
    assert _status_of(raw) in range(200, 500)


def test_numpy_dtypes_match_declared() -> None:
    ctx = _guard(_body([0.5, 0.0, 3.0]))
    assert ctx.request is not None
    assert ctx.request.inputs["x"].dtype == np.float32 and ctx.request.inputs["c"].dtype == np.int64


def _doc(*inputs: tuple[str, str, object, object]) -> bytes:
    return json.dumps(
        {"inputs": [{"name": n, "datatype": d, "shape": s, "data": v} for n, d, s, v in inputs]}
    ).encode()


_C1 = ("c", "INT64", [1, 1], [1])


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (_doc(("x", "FP32", [0, 3], []), ("c", "INT64", [0, 1], [])), 422, "empty_tensor"),  # the issue's
        (_doc(("x", "FP32", [1, 0], []), _C1), 422, "empty_tensor"),  # a row without columns
        (_doc(("x", "FP32", [0, 0], []), _C1), 422, "empty_tensor"),
        (_doc(("x", "FP32", [0], []), _C1), 422, "empty_tensor"),
        (_doc(("x", "FP32", [0, 2**62, 2**62], []), _C1), 422, "empty_tensor"),  # reshape would overflow
        (_doc(("x", "BYTES", [0], []), _C1), 422, "empty_tensor"),
        (_doc(("x", "FP32", [2**31, 2**31], [1.0]), _C1), 422, "shape_mismatch"),  # product past int32
        (_doc(("x", "FP32", [2, 3], [0.5, 0.0, 1.0]), _C1), 422, "shape_mismatch"),
        (_doc(("x", "FP32", [3], [0.5, 0.0, 1.0]), _C1), 422, "wrong_shape"),  # 1-D for a 2-D input
        (_doc(("x", "FP32", [], 0.5), _C1), 400, "malformed_request"),  # a scalar
        (_doc(("x", "FP32", [-1, 3], [0.5, 0.0, 1.0]), _C1), 400, "malformed_request"),
        (_doc(("x", "FP32", [2, 3], [0.5, 0.0, 1.0] * 2), _C1), 422, "wrong_shape"),  # 2 rows against 1
        (_doc(("x", "FP32", [1, 3], [0.5, 0.0, 1.0]), ("c", "INT64", [0, 1], [])), 422, "empty_tensor"),
    ],
)
def test_degenerate_shapes_are_refused_with_a_code(body: bytes, status: int, code: str) -> None:
    with pytest.raises(BastionError) as err:
        _guard(body)
    assert (err.value.status, err.value.code) == (status, code)


def test_the_guard_refuses_a_request_of_no_rows_however_it_was_built() -> None:
    from bastion.context import InferRequest

    async def read(limit: int) -> bytes:
        return b""

    ctx = RequestContext("r", Action.INFER, 0.0, None, read, model=MODEL, grant=GRANT)
    empty = {"x": np.zeros((0, 3), np.float32), "c": np.zeros((0, 1), np.int64)}
    ctx.request = InferRequest(None, empty, None, {}, 0)
    with pytest.raises(SchemaViolation) as err:
        asyncio.run(GuardInput(max_rows=10, hmac_key=b"k" * 32)(ctx))
    assert err.value.code == "empty_tensor"


def test_the_screen_measures_zero_rows_without_failing() -> None:
    from bastion.ood import DistributionScreen

    screen = DistributionScreen(np.random.default_rng(0).normal(size=(100, 3)))
    z, squared = screen.measure({"x": np.zeros((0, 3), np.float32)}, ["x"])
    assert z.shape == (0, 3) and squared == []
