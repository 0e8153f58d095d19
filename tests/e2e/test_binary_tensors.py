"""The V2 binary tensor extension over real HTTP: Triton's own client with its default settings gets
the JSON path's answers and refusals; every hostile JSON case has a binary twin, and a gRPC twin,
refused the same way, never with a 5xx and without reaching the model."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from bastion.demo import infer_request
from bastion.errors import GRPC_STATUS
from bastion.grpc import grpc_predict_v2_pb2 as pb
from bastion.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub
from tests.helpers import RunningServer, create_key, free_port, run_cli, start_server, write_test_deployment

MODEL = "breast-cancer"

# dp_scores with a large budget: an answer moves the budget that metadata shows, a refusal must not;
# an identical batch from the same key is answered from the keyed cache and spends nothing.
ROLE = """
[roles.bindp]
rate = 100000
burst = 100000
daily_quota = 100000000
[[roles.bindp.grants]]
models = ["breast-cancer"]
actions = ["infer", "metadata", "aggregate"]
output = "dp_scores"
epsilon = 0.5
privacy_budget = 100000.0

"""


@dataclass
class Served:
    server: RunningServer
    keys: dict[str, str]
    features: np.ndarray  # the breast-cancer rows, FP32
    grpc_url: str
    config: Any

    @property
    def url(self) -> str:
        return self.server.base_url.removeprefix("http://")

    def triton(self) -> triton.InferenceServerClient:
        return triton.InferenceServerClient(self.url)

    def auth(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[role]}"}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("binary")
    grpc_port = free_port()
    config, build = write_test_deployment(root, extra=ROLE + f"[grpc]\nenabled = true\nport = {grpc_port}\n\n")
    keys = {role: create_key(config, role) for role in ("analyst", "admin", "outsider", "tight", "bindp")}
    server = start_server(config, root / "server.log")
    try:
        yield Served(server, keys, np.asarray(build.features, dtype=np.float32), f"127.0.0.1:{grpc_port}", config)
    finally:
        server.stop()
    log = (root / "server.log").read_text()
    assert "Traceback" not in log and "unhandled error" not in log
    for key in keys.values():
        assert key not in log


def _input(x: np.ndarray, name: str = "features") -> triton.InferInput:
    tensor = triton.InferInput(name, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)  # binary_data=True: the default
    return tensor


def _json_answer(served: Served, role: str, x: np.ndarray, outputs: list[str] | None = None) -> dict:
    body = infer_request(x)
    if outputs is not None:
        body["outputs"] = [{"name": o} for o in outputs]
    with served.server.client(served.keys[role]) as c:
        r = c.post(f"/v2/models/{MODEL}/infer", json=body)
    assert r.status_code == 200, r.text
    return {o["name"]: o for o in r.json()["outputs"]}


# -- Triton's client, default settings ----------------------------------------------------------


def test_health_and_metadata(served: Served) -> None:
    client = served.triton()
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL, headers=served.auth("analyst"))
    assert "binary_tensor_data" in client.get_server_metadata(headers=served.auth("analyst"))["extensions"]
    meta = client.get_model_metadata(MODEL, headers=served.auth("analyst"))
    assert meta["name"] == MODEL and meta["inputs"][0]["name"] == "features"
    assert [o["name"] for o in meta["outputs"]] == ["label"]  # what the label-only key gets


def test_infer_gets_the_json_paths_answer(served: Served) -> None:
    x = served.features[:20]
    want = [s.encode() for s in _json_answer(served, "analyst", x)["label"]["data"]]
    result = served.triton().infer(MODEL, [_input(x)], headers=served.auth("analyst"), request_id="bin-7")
    response = result.get_response()
    assert response["id"] == "bin-7" and response["model_name"] == MODEL
    (label,) = response["outputs"]
    assert label["parameters"]["binary_data_size"] > 0 and "data" not in label  # sent as raw bytes
    assert list(result.as_numpy("label")) == want
    assert len(set(want)) == 2  # the rows span both classes: the comparison can fail


def test_output_selection_and_mixed_encodings(served: Served) -> None:
    x = served.features[:5]
    want = _json_answer(served, "admin", x)
    client = served.triton()
    only = client.infer(
        MODEL,
        [_input(x)],
        outputs=[triton.InferRequestedOutput("probabilities")],
        headers=served.auth("admin"),
    )
    assert [o["name"] for o in only.get_response()["outputs"]] == ["probabilities"]
    assert only.as_numpy("label") is None
    probabilities = only.as_numpy("probabilities")
    assert probabilities.shape == (5, 2) and probabilities.dtype == np.float32
    assert np.array_equal(probabilities.ravel(), np.asarray(want["probabilities"]["data"], dtype=np.float32))
    mixed = client.infer(
        MODEL,
        [_input(x)],
        outputs=[
            triton.InferRequestedOutput("label", binary_data=False),
            triton.InferRequestedOutput("probabilities"),
        ],
        headers=served.auth("admin"),
    )
    by_name = {o["name"]: o for o in mixed.get_response()["outputs"]}
    assert by_name["label"]["data"] == want["label"]["data"] and "parameters" not in by_name["label"]
    assert "binary_data_size" in by_name["probabilities"]["parameters"]
    # JSON inputs with binary outputs (no Inference-Header-Content-Length on the request).
    json_in = triton.InferInput("features", list(x.shape), "FP32")
    json_in.set_data_from_numpy(x, binary_data=False)
    answer = client.infer(MODEL, [json_in], headers=served.auth("admin"))
    assert list(answer.as_numpy("label")) == [s.encode() for s in want["label"]["data"]]


@pytest.mark.parametrize(
    ("name", "role", "outputs", "x", "status", "message"),
    [
        ("wrong key", "wrong", None, None, "401", "missing or invalid credentials"),
        ("model not granted", "outsider", None, None, "403", "not permitted to infer model"),
        ("output not granted", "analyst", ["probabilities"], None, "403", "output 'probabilities' is not granted"),
        ("out of range", "analyst", None, "out_of_range", "422", "above its maximum"),
        ("not finite", "analyst", None, "nan", "422", "NaN or infinity is not allowed"),
    ],
)  # fmt: skip
def test_refusals_are_tritonclients_own_exception(
    served: Served, name: str, role: str, outputs: list[str] | None, x: str | None, status: str, message: str
) -> None:
    rows = served.features[:2].copy()
    if x == "out_of_range":
        rows[0, 3] = 1e6
    elif x == "nan":
        rows[1, 5] = np.nan
    headers = {"Authorization": "Bearer bst_nope_nope"} if role == "wrong" else served.auth(role)
    requested = [triton.InferRequestedOutput(o) for o in outputs] if outputs else None
    with pytest.raises(InferenceServerException) as err:
        served.triton().infer(MODEL, [_input(rows)], outputs=requested, headers=headers)
    assert err.value.status() == status, f"{name}: {err.value}"
    assert message in (err.value.message() or ""), f"{name}: {err.value}"
    assert "1000000" not in str(err.value)  # the offending value is not echoed


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_a_compressed_request_is_told_so_not_that_it_is_not_json(served: Served, algorithm: str) -> None:
    # tritonclient's request_compression_algorithm: the body arrives compressed, its header length the
    # uncompressed JSON's. It was refused 400 "request body is not valid JSON" (red team issue 10, F9).
    with pytest.raises(InferenceServerException) as err:
        served.triton().infer(
            MODEL, [_input(served.features[:2])], headers=served.auth("analyst"),
            request_compression_algorithm=algorithm,
        )  # fmt: skip
    assert err.value.status() == "400"
    assert "Content-Encoding" in (err.value.message() or ""), err.value
    with httpx.Client(base_url=served.server.base_url) as c:
        r = c.post(f"/v2/models/{MODEL}/infer", content=b"\x1f\x8b", headers={"Content-Encoding": algorithm,
                   **served.auth("analyst")})  # fmt: skip
    assert (r.status_code, r.json()["code"]) == (400, "unsupported_content_encoding")
    # Compressed answers (response_compression_algorithm) are not asked of the server: it answers plainly.
    answer = served.triton().infer(
        MODEL, [_input(served.features[:2])], headers=served.auth("analyst"),
        response_compression_algorithm=algorithm,
    )  # fmt: skip
    assert answer.as_numpy("label") is not None


def test_over_the_rate_is_429_from_tritonclient(served: Served) -> None:
    client, x = served.triton(), served.features[:1]
    answers = []
    for _ in range(6):  # the tight role: burst 3, 0.5 a second
        try:
            client.infer(MODEL, [_input(x)], headers=served.auth("tight"))
            answers.append(("200", ""))
        except InferenceServerException as e:
            answers.append((e.status(), e.message() or ""))
    assert [status for status, _ in answers] == ["200"] * 3 + ["429"] * 3
    assert all("rate limit" in message for _, message in answers[3:])


# -- one keyed fingerprint for both encodings ---------------------------------------------------


def _budget(c: httpx.Client) -> float:
    return float(c.get(f"/v2/models/{MODEL}").json()["parameters"]["privacy_budget_remaining"])


def test_the_same_rows_binary_or_json_are_one_batch_to_the_answer_cache(served: Served) -> None:
    """Re-encoding a batch does not buy a fresh draw of DP noise: the keyed HMAC is over the tensors."""
    x = served.features[40:43]
    with served.server.client(served.keys["bindp"]) as c:
        before = _budget(c)
        first = _json_answer(served, "bindp", x)["probabilities"]["data"]
        after_json = _budget(c)
        result = served.triton().infer(MODEL, [_input(x)], headers=served.auth("bindp"))
        assert _budget(c) == after_json == pytest.approx(before - 0.5 * 3)
    assert np.array_equal(result.as_numpy("probabilities").ravel(), np.asarray(first, dtype=np.float32))


# -- hostile framing, each with its JSON twin ---------------------------------------------------


def _framed(header: Any, raw: bytes = b"", length: int | None = None) -> tuple[bytes, dict[str, str]]:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return text + raw, {"Inference-Header-Content-Length": str(len(text) if length is None else length)}


def _binary(doc: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    """A JSON request's twin: each numeric input's data moved to raw bytes after the header."""
    inputs, raws = [], []
    for entry in doc["inputs"]:
        entry = dict(entry)
        data = entry.pop("data")
        dtype = {"FP32": "<f4", "FP64": "<f8", "INT64": "<i8"}[entry["datatype"]]
        raw = np.asarray(data, dtype=dtype).tobytes()
        inputs.append({**entry, "parameters": {"binary_data_size": len(raw)}})
        raws.append(raw)
    return _framed({**doc, "inputs": inputs}, b"".join(raws))


def _features(raw: bytes, shape: list[int], datatype: str = "FP32") -> dict[str, Any]:
    return {
        "name": "features",
        "shape": shape,
        "datatype": datatype,
        "parameters": {"binary_data_size": len(raw)},
    }


def _doc(data: Any, shape: list[int] | None = None, datatype: str = "FP32", **extra: Any) -> dict[str, Any]:
    return {
        "inputs": [{"name": "features", "shape": shape or [1, 30], "datatype": datatype, "data": data}],
        **extra,
    }


def _strings(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def hostile_cases(served: Served) -> list[tuple[str, Any, tuple[bytes, dict[str, str]], int, str | None]]:
    """(name, JSON body, its binary twin, status, code both give; None: the twin's code differs)."""
    good = [round(float(v), 4) for v in served.features[0]]
    high, low = list(good), list(good)
    high[3], low[0] = 1e6, -5.0
    row = np.asarray(good, dtype="<f4").tobytes()
    nan_payload = row[:20] + struct.pack("<I", 0x7F800001) + row[24:]  # a signalling NaN with a payload
    inf = row[:20] + np.float32(np.inf).tobytes() + row[24:]
    with_nan = json.dumps(_doc(good)).replace(str(good[5]), "NaN", 1)
    with_inf = json.dumps(_doc(good)).replace(str(good[5]), "Infinity", 1)
    return [
        ("out of range (high)", _doc(high), _binary(_doc(high)), 422, "out_of_range"),
        ("out of range (low)", _doc(low), _binary(_doc(low)), 422, "out_of_range"),
        ("NaN", with_nan, _framed({"inputs": [_features(nan_payload, [1, 30])]}, nan_payload), 422, "not_finite"),
        ("Infinity", with_inf, _framed({"inputs": [_features(inf, [1, 30])]}, inf), 422, "not_finite"),
        ("FP32 overflow", _doc([*good[:29], 1e39]), _framed({"inputs": [_features(inf, [1, 30])]}, inf), 422,
         "not_finite"),
        ("wrong shape", _doc(good[:29], [1, 29]), _binary(_doc(good[:29], [1, 29])), 422, "wrong_shape"),
        ("shape and data disagree", _doc(good, [2, 30]), _framed({"inputs": [_features(row, [2, 30])]}, row),
         422, "shape_mismatch"),
        ("wrong datatype (declared)", _doc([int(v) for v in good], datatype="INT64"),
         _binary(_doc([int(v) for v in good], datatype="INT64")), 422, "wrong_datatype"),
        ("wrong datatype (strings)", _doc(["a"] * 30),
         _framed({"inputs": [_features(_strings([b"a"] * 30), [1, 30], "BYTES")]}, _strings([b"a"] * 30)),
         422, None),  # binary: unsupported_datatype (strings are BYTES there)
        ("ragged data", _doc([[1.0, 2.0], [3.0]], [2, 2]),
         _framed({"inputs": [_features(row[:119], [1, 30])]}, row[:119]), 422, None),  # shape_mismatch
        ("unsupported datatype", _doc(good, datatype="BYTES"),
         _framed({"inputs": [_features(_strings([b"1"] * 30), [1, 30], "BYTES")]}, _strings([b"1"] * 30)),
         422, "unsupported_datatype"),
        ("unknown input", {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]},
         _binary({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}), 422,
         "unknown_input"),
        ("too many rows", _doc(good * 300, [300, 30]), _binary(_doc(good * 300, [300, 30])), 413, "too_many_rows"),
        ("oversized body", _doc(good * 6000, [6000, 30]), _binary(_doc(good * 9000, [9000, 30])), 413,
         "payload_too_large"),
        ("malformed JSON", '{"inputs": [', _framed(b'{"inputs": [', row), 400, "malformed_json"),
        ("invalid UTF-8", b'{"inputs": "\xff\xfe"}', _framed(b'{"inputs": "\xff\xfe"}', row), 400, "malformed_json"),
        ("deeply nested", "[" * 5000 + "]" * 5000, _framed(("[" * 5000 + "]" * 5000).encode(), row), 400,
         "malformed_json"),
        ("not an object", "[1, 2, 3]", _framed(b"[1, 2, 3]", row), 400, "malformed_request"),
        ("no inputs", {"inputs": []}, _framed({"inputs": []}), 400, "malformed_request"),
        ("negative shape", _doc(good, [-1, 30]), _binary(_doc(good, [-1, 30])), 400, "malformed_request"),
        ("id not a string", _doc(good, id=5), _binary(_doc(good, id=5)), 400, "malformed_request"),
    ]  # fmt: skip


def binary_only_cases(served: Served) -> list[tuple[str, tuple[bytes, dict[str, str]], int, str]]:
    """Faults only the binary framing can have."""
    row = served.features[0].astype("<f4").tobytes()
    header = {"inputs": [_features(row, [1, 30])]}
    body, _ = _framed(header, row)
    text_length = len(json.dumps(header))
    return [
        ("header length negative", (body, {"Inference-Header-Content-Length": "-5"}), 400, "bad_header_length"),
        ("header length not a number", (body, {"Inference-Header-Content-Length": "abc"}), 400,
         "bad_header_length"),
        ("header length empty", (body, {"Inference-Header-Content-Length": ""}), 400, "bad_header_length"),
        ("header length zero", (body, {"Inference-Header-Content-Length": "0"}), 400, "bad_header_length"),
        ("header length past the body", (body, {"Inference-Header-Content-Length": str(len(body) + 1)}), 400,
         "bad_header_length"),
        ("header length cuts the JSON", _framed(header, row, text_length - 3), 400, "malformed_json"),
        ("header length one byte long", _framed(header, row, text_length + 1), 400, "malformed_json"),
        ("header missing", (body, {}), 400, "bad_header_length"),
        ("size overruns the body", _framed({"inputs": [{**_features(row, [1, 30]),
                                                        "parameters": {"binary_data_size": 240}}]}, row), 400,
         "malformed_binary"),
        ("trailing bytes", _framed(header, row + b"\0" * 8), 400, "malformed_binary"),
        ("size not shape x itemsize", _framed({"inputs": [_features(row + row[:4], [1, 30])]}, row + row[:4]),
         422, "shape_mismatch"),
        ("binary input also has data", _framed({"inputs": [{**_features(row, [1, 30]), "data": [0.0] * 30}]},
                                               row), 400, "malformed_binary"),
        # With the header sent, a null size is a bad size, not a missing header (red team issue 10, F6).
        ("size null", _framed({"inputs": [{**_features(row, [1, 30]), "parameters": {"binary_data_size": None}}]},
                              row), 400, "malformed_binary"),
        ("BYTES element overruns", _framed({"inputs": [_features(struct.pack("<I", 1000) + b"ab", [1, 1],
                                                                 "BYTES")]}, struct.pack("<I", 1000) + b"ab"),
         400, "malformed_binary"),
        ("BF16", _framed({"inputs": [_features(row[:60], [1, 30], "BF16")]}, row[:60]), 422,
         "unsupported_datatype"),
        ("zero rows", _framed({"inputs": [_features(b"", [0, 30])]}), 422, "empty_tensor"),
        ("binary_data_output not a boolean", _framed({**header, "parameters": {"binary_data_output": "yes"}},
                                                     row), 400, "malformed_request"),
        ("FP64 where the model takes FP32", _framed({"inputs": [_features(row * 2, [1, 30], "FP64")]}, row * 2),
         422, "wrong_datatype"),
    ]  # fmt: skip


def _post(c: httpx.Client, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    if isinstance(body, dict):
        return c.post(f"/v2/models/{MODEL}/infer", json=body)
    return c.post(f"/v2/models/{MODEL}/infer", content=body, headers=headers or {})


def _assert_refused(r: httpx.Response, status: int, code: str | None, name: str) -> None:
    assert r.status_code == status, f"{name}: {r.status_code} {r.text[:300]}"
    assert r.headers["content-type"].startswith("application/json"), name
    assert "inference-header-content-length" not in r.headers, name  # errors stay JSON
    body = r.json()
    assert set(body) == {"error", "code"}, name
    if code is not None:
        assert body["code"] == code, f"{name}: {body}"
    assert "1000000" not in r.text  # the offending value is not echoed


def test_every_hostile_json_case_has_a_binary_twin_refused_alike(served: Served) -> None:
    with served.server.client(served.keys["bindp"]) as c:
        before = _budget(c)
        for name, doc, (body, headers), status, code in hostile_cases(served):
            _assert_refused(_post(c, doc), status, code, f"JSON {name}")
            _assert_refused(_post(c, body, headers), status, code, f"binary {name}")
        for name, (body, headers), status, code in binary_only_cases(served):
            _assert_refused(_post(c, body, headers), status, code, f"binary {name}")
        assert _budget(c) == before  # nothing reached the model's answer


def test_the_control_a_valid_binary_request_spends_the_budget_watched_above(served: Served) -> None:
    row = served.features[7:8].astype("<f4").tobytes()
    with served.server.client(served.keys["bindp"]) as c:
        before = _budget(c)
        r = _post(c, *_framed({"inputs": [_features(row, [1, 30])]}, row))
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("application/json")  # no binary output asked for
        assert _budget(c) == pytest.approx(before - 0.5)


def test_a_bad_header_length_is_not_examined_before_identity(served: Served) -> None:
    with httpx.Client(base_url=served.server.base_url) as c:
        r = _post(c, b"\0" * 16, {"Inference-Header-Content-Length": "-1", "Authorization": "Bearer nope"})
    _assert_refused(r, 401, "unauthenticated", "anonymous")


def test_aggregates_take_binary_inputs_and_refuse_binary_outputs(served: Served) -> None:
    rows = served.features[:10].astype("<f4")
    header = {"inputs": [_features(rows.tobytes(), [10, 30])]}
    with served.server.client(served.keys["bindp"]) as c:
        ok = c.post(f"/v2/models/{MODEL}/aggregate", content=_framed(header, rows.tobytes())[0],
                    headers=_framed(header, rows.tobytes())[1])  # fmt: skip
        assert ok.status_code == 200, ok.text
        assert ok.json()["rows"] == 10
        body, headers = _framed({**header, "parameters": {"binary_data_output": True}}, rows.tobytes())
        refused = c.post(f"/v2/models/{MODEL}/aggregate", content=body, headers=headers)
    _assert_refused(refused, 400, "unsupported_parameter", "aggregate binary output")


# -- the gRPC twin of each hostile JSON case ----------------------------------------------------

_TYPED = {"FP32": "fp32_contents", "FP64": "fp64_contents", "INT64": "int64_contents", "BYTES": "bytes_contents"}


def _grpc_twin(doc: dict[str, Any], *, raw: bool) -> pb.ModelInferRequest:
    """The JSON document as a ModelInferRequest: its values as typed contents, or as raw bytes."""
    message = pb.ModelInferRequest(model_name=MODEL)
    if isinstance(doc.get("id"), str):
        message.id = doc["id"]
    for entry in doc["inputs"]:
        tensor = message.inputs.add(name=entry["name"], datatype=entry["datatype"], shape=entry["shape"])
        values = np.asarray(entry["data"], dtype=object).ravel().tolist()
        if entry["datatype"] == "BYTES" or all(isinstance(v, str) for v in values):
            # Strings, or values declared BYTES: BYTES elements either way (as the binary twins send them).
            elements = [str(v).encode() for v in values]
            if raw:
                message.raw_input_contents.append(b"".join(struct.pack("<I", len(e)) + e for e in elements))
            else:
                tensor.contents.bytes_contents.extend(elements)
        elif raw:
            dtype = {"FP32": "<f4", "FP64": "<f8", "INT64": "<i8"}[entry["datatype"]]
            with np.errstate(over="ignore"):
                message.raw_input_contents.append(np.asarray(values, dtype="<f8").astype(dtype).tobytes())
        else:
            field = getattr(tensor.contents, _TYPED[entry["datatype"]])
            field.extend(int(v) if entry["datatype"] == "INT64" else float(v) for v in values)
    return message


def test_every_hostile_json_case_has_a_grpc_twin_refused_alike(served: Served) -> None:
    """Each JSON case a gRPC message can say (a parsed document, not bytes that are no JSON), typed
    and raw: the same status (through bastion.errors' one table) and the same stable code, an audit
    record each, and nothing reaching the model (the budget of a DP key does not move)."""
    metadata = (("authorization", f"Bearer {served.keys['bindp']}"),)
    request_ids = []
    with served.server.client(served.keys["bindp"]) as c, grpc.insecure_channel(
        served.grpc_url, options=[("grpc.max_send_message_length", 8 << 20)]
    ) as channel:
        stub = GRPCInferenceServiceStub(channel)
        before = _budget(c)
        twins = 0
        for name, doc, _, status, code in hostile_cases(served):
            if not isinstance(doc, dict) or not isinstance(doc.get("id", ""), str) or any(
                not isinstance(e.get("data"), list) or any(isinstance(v, list) for v in e["data"])
                for e in doc["inputs"]
            ):
                continue  # no JSON document, a number as id, nested data: no gRPC message says it alike
            if name == "oversized body":  # 4 bytes a value, not JSON's ~10: as many rows as the binary twin
                row = doc["inputs"][0]["data"][:30]
                doc = {"inputs": [{**doc["inputs"][0], "data": row * 9000, "shape": [9000, 30]}]}
            for raw in (False, True):
                if name == "FP32 overflow" and not raw:
                    continue  # fp32_contents cannot hold 1e39; the raw twin carries its infinity
                with pytest.raises(grpc.RpcError) as err:
                    stub.ModelInfer(_grpc_twin(doc, raw=raw), metadata=metadata, timeout=30)
                error: Any = err.value
                trailing = dict(error.trailing_metadata() or ())
                got = (error.code().name, trailing.get("bastion-error-code"))
                label = f"{name} ({'raw' if raw else 'typed'}): {error.details()}"
                assert got[0] == GRPC_STATUS[status], label
                if code is not None:
                    assert got[1] == code, label
                request_ids.append(trailing["x-request-id"])
                twins += 1
        assert twins >= 24
        assert _budget(c) == before  # nothing reached the model's answer
    out = served.server.log_path.parent / "grpc-twins-audit.jsonl"
    run_cli("audit", "export", "--config", served.config, "-o", out)
    audited = {json.loads(line).get("request_id") for line in out.read_text().splitlines()}
    assert [rid for rid in request_ids if rid not in audited] == []
