"""End to end: the KServe Python SDK's own clients against the real server, REST and gRPC, each with
its default settings (binary tensors: `set_data_from_numpy`'s default), as a KServe user would call
Bastion; refusals of each kind surface as the client's own exception type.

The one setting that is not the SDK's default is `RESTConfig(protocol="v2")`: the REST client speaks
V1 unless told otherwise, and V1 is not a protocol Bastion serves. The SDK's clients have no metadata
call, so the metadata tests read Bastion's answers with the SDK's own V2 data models (REST) and its own
generated gRPC stub and messages."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import httpx
import numpy as np
import pytest

# The SDK ships no type information (no py.typed): its names are Any here.
from kserve import (  # type: ignore[import-untyped]
    InferenceGRPCClient,
    InferenceRESTClient,
    InferInput,
    InferRequest,
    InferResponse,
    RESTConfig,
)
from kserve.protocol.grpc import grpc_predict_v2_pb2 as kpb  # type: ignore[import-untyped]
from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub  # type: ignore[import-untyped]
from kserve.protocol.infer_type import RequestedOutput  # type: ignore[import-untyped]
from kserve.protocol.rest.v2_datamodels import ModelMetadataResponse, ServerMetadataResponse  # type: ignore[import-untyped]

from bastion.demo import infer_request
from tests.helpers import RunningServer, create_key, free_port, start_server, write_test_deployment

pytestmark = pytest.mark.slow

MODEL = "breast-cancer"
WRONG_KEY = "bst_0123456789abcdef_" + "A" * 43
T = TypeVar("T")


@dataclass
class Served:
    server: RunningServer
    keys: dict[str, str]
    features: np.ndarray  # the breast-cancer rows, FP32
    grpc_url: str

    def rest(self) -> InferenceRESTClient:
        return InferenceRESTClient(RESTConfig(protocol="v2"))

    def grpc(self) -> InferenceGRPCClient:
        return InferenceGRPCClient(self.grpc_url)

    def auth(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys.get(role, WRONG_KEY)}"}

    def metadata(self, role: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.keys.get(role, WRONG_KEY)}"),)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("kserve")
    port = free_port()
    config, build = write_test_deployment(root, extra=f"[grpc]\nenabled = true\nport = {port}\n\n")
    roles = ("analyst", "admin", "outsider")
    keys = {role: create_key(config, role) for role in roles}
    # One rate-limited key per transport, so the two 429 tests do not share a bucket.
    keys |= {"tight-rest": create_key(config, "tight"), "tight-grpc": create_key(config, "tight")}
    server = start_server(config, root / "server.log")
    try:
        yield Served(server, keys, np.asarray(build.features, dtype=np.float32), f"127.0.0.1:{port}")
    finally:
        server.stop()
    log = (root / "server.log").read_text()
    assert "Traceback" not in log and "unhandled error" not in log
    for key in keys.values():
        assert key not in log


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


def request(
    rows: np.ndarray, *, request_id: str | None = None, outputs: list[str] | None = None
) -> InferRequest:
    tensor = InferInput("features", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows)  # binary_data=True: the SDK's default
    wanted = [RequestedOutput(name) for name in outputs] if outputs else None
    return InferRequest(MODEL, [tensor], request_id=request_id, request_outputs=wanted)


def json_answer(
    served: Served, role: str, rows: np.ndarray, outputs: list[str] | None = None
) -> dict[str, Any]:
    """The plain V2 JSON path's answer, by output name: what the SDK's answers must equal."""
    body = infer_request(rows)
    if outputs is not None:
        body["outputs"] = [{"name": o} for o in outputs]
    with served.server.client(served.keys[role]) as c:
        r = c.post(f"/v2/models/{MODEL}/infer", json=body)
    assert r.status_code == 200, r.text
    return {o["name"]: o for o in r.json()["outputs"]}


async def rest_infer(served: Served, req: InferRequest, role: str) -> InferResponse:
    async with served.rest() as client:
        return await client.infer(served.server.base_url, req, model_name=MODEL, headers=served.auth(role))


async def grpc_infer(served: Served, req: InferRequest, role: str) -> InferResponse:
    async with served.grpc() as client:
        return await client.infer(req, headers=served.metadata(role))


def labels(response: InferResponse) -> list[str]:
    (label,) = [o for o in response.outputs if o.name == "label"]
    return [v.decode() if isinstance(v, bytes) else str(v) for v in label.as_numpy().ravel()]


# -- health and metadata ------------------------------------------------------------------------


def test_health_over_rest(served: Served) -> None:
    async def go() -> tuple[bool, bool, bool, bool]:
        async with served.rest() as client:
            url = served.server.base_url
            return (
                await client.is_server_live(url),
                await client.is_server_ready(url),
                await client.is_model_ready(url, MODEL, headers=served.auth("analyst")),
                await client.is_model_ready(url, MODEL),  # no key: V2 says a 4xx reads as "not ready"
            )

    assert run(go()) == (True, True, True, False)


def test_health_over_grpc(served: Served) -> None:
    async def go() -> tuple[bool, bool, bool]:
        async with served.grpc() as client:
            return (
                await client.is_server_live(),
                await client.is_server_ready(),
                await client.is_model_ready(MODEL, headers=served.metadata("analyst")),
            )

    assert run(go()) == (True, True, True)

    async def without_key() -> bool:
        async with served.grpc() as client:
            return bool(await client.is_model_ready(MODEL))

    with pytest.raises(grpc.RpcError) as err:
        run(without_key())
    assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED


def test_metadata_reads_as_kserves_own_v2_models_over_rest(served: Served) -> None:
    with served.server.client(served.keys["analyst"]) as c:
        server = ServerMetadataResponse.model_validate_json(c.get("/v2").content)
        model = ModelMetadataResponse.model_validate_json(c.get(f"/v2/models/{MODEL}").content)
    assert server.name == "bastion" and "binary_tensor_data" in server.extensions
    assert model.name == MODEL and model.inputs[0].name == "features" and model.inputs[0].shape == [-1, 30]
    assert [o.name for o in model.outputs] == ["label"]  # only what this key's answers carry


def test_metadata_reads_with_kserves_own_grpc_stub(served: Served) -> None:
    async def go(role: str | None) -> tuple[Any, Any]:
        async with grpc.aio.insecure_channel(served.grpc_url) as channel:
            stub = GRPCInferenceServiceStub(channel)
            metadata = served.metadata(role) if role else None
            return (
                await stub.ServerMetadata(kpb.ServerMetadataRequest(), metadata=metadata, timeout=30),
                await stub.ModelMetadata(kpb.ModelMetadataRequest(name=MODEL), metadata=metadata, timeout=30),
            )

    server, model = run(go("analyst"))
    assert server.name == "bastion"
    assert (
        model.name == MODEL and model.inputs[0].name == "features" and list(model.inputs[0].shape) == [-1, 30]
    )
    assert [o.name for o in model.outputs] == ["label"]
    with pytest.raises(grpc.RpcError) as err:
        run(go(None))
    assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED


# -- inference -----------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_infer_gets_the_json_paths_answer_and_echoes_the_id(served: Served, transport: str) -> None:
    rows = served.features[:20]
    want = json_answer(served, "analyst", rows)["label"]["data"]
    assert len(set(want)) == 2  # the rows span both classes: the comparison can fail
    req = request(rows, request_id=f"ks-{transport}-7")
    if transport == "rest":
        body, header_length = req.to_rest()
        assert header_length is not None and isinstance(body, bytes)  # the SDK sends the binary extension
        response = run(rest_infer(served, req, "analyst"))
    else:
        assert req.to_grpc().raw_input_contents  # raw tensors, the SDK's gRPC default
        response = run(grpc_infer(served, req, "analyst"))
    assert labels(response) == want
    assert response.id == f"ks-{transport}-7" and response.model_name == MODEL
    assert [o.name for o in response.outputs] == ["label"]


@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_output_selection(served: Served, transport: str) -> None:
    rows = served.features[:4]
    want = json_answer(served, "admin", rows)
    infer = rest_infer if transport == "rest" else grpc_infer
    only_label = run(infer(served, request(rows, outputs=["label"]), "admin"))
    assert [o.name for o in only_label.outputs] == ["label"]
    assert labels(only_label) == want["label"]["data"]
    only_probabilities = run(infer(served, request(rows, outputs=["probabilities"]), "admin"))
    (probabilities,) = only_probabilities.outputs
    assert probabilities.name == "probabilities"
    got = probabilities.as_numpy()
    assert got.shape == (4, 2) and np.allclose(got.sum(axis=1), 1, atol=1e-5)
    assert np.allclose(got.ravel(), want["probabilities"]["data"], atol=1e-6)


def test_binary_outputs_when_the_rest_client_asks_for_them(served: Served) -> None:
    rows = served.features[:3]
    want = json_answer(served, "admin", rows, ["probabilities"])["probabilities"]["data"]
    req = request(rows)
    req.request_outputs = [RequestedOutput("probabilities", parameters={"binary_data": True})]
    headers: dict[str, str] = {}

    async def go() -> InferResponse:
        async with served.rest() as client:
            url = served.server.base_url
            auth = served.auth("admin")
            return await client.infer(url, req, model_name=MODEL, headers=auth, response_headers=headers)

    (probabilities,) = run(go()).outputs
    assert int(headers["inference-header-content-length"]) > 0  # answered with raw bytes after the JSON
    assert np.allclose(probabilities.as_numpy().ravel(), want, atol=1e-6)


# -- refusals, as the SDK's own exception types ----------------------------------------------------

REFUSALS = [
    # (name, role, outputs, poisoned, REST status, gRPC status)
    ("wrong key", "wrong", None, False, 401, grpc.StatusCode.UNAUTHENTICATED),
    ("model not granted", "outsider", None, False, 403, grpc.StatusCode.PERMISSION_DENIED),
    ("output not granted", "analyst", ["probabilities"], False, 403, grpc.StatusCode.PERMISSION_DENIED),
    ("out of range", "analyst", None, True, 422, grpc.StatusCode.INVALID_ARGUMENT),
]


@pytest.mark.parametrize(("name", "role", "outputs", "poisoned", "status", "_code"), REFUSALS)
def test_rest_refusals_are_httpx_status_errors(
    served: Served, name: str, role: str, outputs: list[str] | None, poisoned: bool, status: int, _code: Any
) -> None:
    rows = served.features[:2].copy()
    if poisoned:
        rows[0, 3] = 1e6
    with pytest.raises(httpx.HTTPStatusError) as err:  # what InferenceRESTClient.infer documents
        run(rest_infer(served, request(rows, outputs=outputs), role))
    assert err.value.response.status_code == status, f"{name}: {err.value}"
    assert err.value.response.json().keys() == {"error", "code"}
    assert "1000000" not in str(err.value) and WRONG_KEY not in str(err.value)


@pytest.mark.parametrize(("name", "role", "outputs", "poisoned", "_status", "code"), REFUSALS)
def test_grpc_refusals_are_rpc_errors(
    served: Served, name: str, role: str, outputs: list[str] | None, poisoned: bool, _status: int, code: Any
) -> None:
    rows = served.features[:2].copy()
    if poisoned:
        rows[0, 3] = 1e6
    with pytest.raises(grpc.RpcError) as err:  # what InferenceGRPCClient.infer documents
        run(grpc_infer(served, request(rows, outputs=outputs), role))
    assert err.value.code() is code, f"{name}: {err.value}"
    details = err.value.details() or ""
    assert "1000000" not in details and WRONG_KEY not in details


def test_over_the_rate_is_429_over_rest(served: Served) -> None:
    async def go() -> list[tuple[int, str]]:
        answers = []
        async with served.rest() as client:
            for _ in range(5):  # the tight role: burst 3, 0.5 a second
                try:
                    await client.infer(
                        served.server.base_url,
                        request(served.features[:1]),
                        model_name=MODEL,
                        headers=served.auth("tight-rest"),
                    )
                    answers.append((200, ""))
                except httpx.HTTPStatusError as e:
                    answers.append((e.response.status_code, e.response.headers.get("retry-after", "")))
        return answers

    answers = run(go())
    assert [status for status, _ in answers] == [200] * 3 + [429] * 2
    assert all(int(retry) >= 1 for _, retry in answers[3:])


def test_over_the_rate_is_resource_exhausted_over_grpc(served: Served) -> None:
    async def go() -> list[str]:
        answers = []
        async with served.grpc() as client:
            for _ in range(5):
                try:
                    await client.infer(request(served.features[:1]), headers=served.metadata("tight-grpc"))
                    answers.append("OK")
                except grpc.aio.AioRpcError as e:
                    retry = dict(e.trailing_metadata() or ()).get("retry-after", "")
                    answers.append(f"{e.code().name} {int(str(retry)) >= 1}")
        return answers

    assert run(go()) == ["OK"] * 3 + ["RESOURCE_EXHAUSTED True"] * 2
