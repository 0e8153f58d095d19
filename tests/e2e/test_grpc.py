"""End to end: V2 over gRPC, driven by Triton's own client with its default settings (raw tensors),
against the real server; refusals from the attacker's side, each the REST path's twin."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from bastion.demo import infer_request
from bastion.grpc import grpc_predict_v2_pb2 as pb
from bastion.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub
from tests.helpers import RunningServer, create_key, free_port, run_cli, start_server, write_test_deployment

ONNX = "breast-cancer"


@dataclass
class GrpcDeployment:
    server: RunningServer
    config: Path
    root: Path
    build: Any
    keys: dict[str, str]
    grpc_url: str
    request_ids: list[str]

    def client(self) -> triton.InferenceServerClient:
        return triton.InferenceServerClient(url=self.grpc_url)

    def headers(self, role: str) -> dict[str, str]:
        return {"authorization": f"Bearer {self.keys[role]}"}

    def rows(self, n: int = 3, start: int = 0) -> np.ndarray:
        return np.asarray(self.build.features[start : start + n], dtype=np.float32)

    def stub_call(self, method: str, request: Any, role: str | None = None) -> tuple[Any, dict[str, str]]:
        """A call with the generated stub: (response, trailing metadata), or grpc.RpcError."""
        with grpc.insecure_channel(self.grpc_url) as channel:
            rpc = getattr(GRPCInferenceServiceStub(channel), method)
            metadata = (("authorization", f"Bearer {self.keys[role]}"),) if role else None
            try:
                response, call = rpc.with_call(request, metadata=metadata, timeout=30)
            except grpc.RpcError as e:
                rid = dict(e.trailing_metadata() or ()).get("x-request-id")  # type: ignore[attr-defined]
                if rid:  # refused by the pipeline (not by gRPC itself): it has an audit record
                    self.request_ids.append(rid)
                raise
        trailing = dict(call.trailing_metadata() or ())
        self.request_ids.append(trailing["x-request-id"])
        return response, trailing


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GrpcDeployment]:
    root = tmp_path_factory.mktemp("grpc")
    port = free_port()
    config, build = write_test_deployment(root, extra=f"[grpc]\nenabled = true\nport = {port}\n\n")
    keys = {role: create_key(config, role) for role in ("analyst", "outsider", "tight", "admin")}
    server = start_server(config, root / "server.log")
    yield GrpcDeployment(server, config, root, build, keys, f"127.0.0.1:{port}", [])
    server.stop()


def _input(rows: np.ndarray, name: str = "features") -> triton.InferInput:
    tensor = triton.InferInput(name, list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows)  # the default: raw_input_contents
    return tensor


def _refused(call: Any) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as err:
        call()
    return err.value


def _rpc_error(dep: GrpcDeployment, method: str, request: Any, role: str | None = "analyst") -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        dep.stub_call(method, request, role)
    return err.value


def _code(error: grpc.RpcError) -> str:
    return dict(error.trailing_metadata() or ()).get("bastion-error-code", "")  # type: ignore[attr-defined]


def _infer_message(rows: np.ndarray, *, raw: bool = True, model: str = ONNX) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name=model, id="g-1")
    tensor = message.inputs.add(name="features", datatype="FP32", shape=list(rows.shape))
    if raw:
        message.raw_input_contents.append(rows.astype("<f4").tobytes())
    else:
        tensor.contents.fp32_contents.extend(rows.ravel().tolist())
    return message


# -- health and metadata ------------------------------------------------------------------------


def test_health_answers_without_credentials(dep: GrpcDeployment) -> None:
    client = dep.client()
    assert client.is_server_live() and client.is_server_ready()


def test_metadata_and_readiness_need_a_key(dep: GrpcDeployment) -> None:
    client = dep.client()
    for call in (
        client.get_server_metadata,
        lambda: client.get_model_metadata(ONNX),
        lambda: client.is_model_ready(ONNX),
    ):
        assert _refused(call).status() == "StatusCode.UNAUTHENTICATED"
    server = client.get_server_metadata(headers=dep.headers("analyst"))
    assert server.name == "bastion"
    meta = client.get_model_metadata(ONNX, headers=dep.headers("analyst"))
    assert meta.name == ONNX and meta.inputs[0].name == "features" and list(meta.inputs[0].shape) == [-1, 30]
    assert [o.name for o in meta.outputs] == ["label"]  # only what this key's answers carry
    assert client.is_model_ready(ONNX, headers=dep.headers("analyst"))


# -- inference -----------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [True, False])
def test_infer_gives_the_json_paths_answer(dep: GrpcDeployment, raw: bool) -> None:
    rows = dep.rows(5, start=10)
    with dep.server.client(dep.keys["analyst"]) as http:
        expected = http.post(f"/v2/models/{ONNX}/infer", json=infer_request(rows)).json()
    if raw:  # tritonclient's default
        result = dep.client().infer(ONNX, [_input(rows)], request_id="r-42", headers=dep.headers("analyst"))
        labels = [v.decode() for v in result.as_numpy("label").ravel()]
        response = result.get_response()
        assert response.raw_output_contents  # raw in, raw out, as Triton answers
    else:
        response, _ = dep.stub_call("ModelInfer", _infer_message(rows, raw=False), "analyst")
        labels = [v.decode() for v in response.outputs[0].contents.bytes_contents]
        assert not response.raw_output_contents
    assert labels == expected["outputs"][0]["data"]
    assert [o.name for o in response.outputs] == ["label"]
    assert response.model_name == ONNX and response.model_version == expected["model_version"]
    if raw:
        assert response.id == "r-42"


def test_output_selection_and_an_ungranted_output(dep: GrpcDeployment) -> None:
    rows = dep.rows(2)
    client = dep.client()
    wanted = [triton.InferRequestedOutput("probabilities"), triton.InferRequestedOutput("label")]
    result = client.infer(ONNX, [_input(rows)], outputs=wanted[1:], headers=dep.headers("admin"))
    assert [o.name for o in result.get_response().outputs] == ["label"]
    result = client.infer(ONNX, [_input(rows)], outputs=wanted[:1], headers=dep.headers("admin"))
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (2, 2) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    error = _refused(
        lambda: client.infer(ONNX, [_input(rows)], outputs=wanted[:1], headers=dep.headers("analyst"))
    )
    assert error.status() == "StatusCode.PERMISSION_DENIED"


# -- refusals, each as REST refuses it --------------------------------------------------------------


@pytest.mark.parametrize(
    "credential", [None, "Bearer bst_0123456789abcdef_" + "A" * 43, "Basic Zm9vOmJhcg=="]
)
def test_no_or_wrong_key_is_unauthenticated(dep: GrpcDeployment, credential: str | None) -> None:
    headers = {"authorization": credential} if credential else None
    error = _refused(lambda: dep.client().infer(ONNX, [_input(dep.rows())], headers=headers))
    assert error.status() == "StatusCode.UNAUTHENTICATED"
    assert error.message() == "missing or invalid credentials (unauthenticated)"


def test_refusals_carry_the_stable_code_and_never_reach_the_model(dep: GrpcDeployment) -> None:
    rows = dep.rows(2)
    out_of_range = rows.copy()
    out_of_range[0, 0] = 1e9
    wrong_size = _infer_message(rows)
    wrong_size.raw_input_contents[0] = wrong_size.raw_input_contents[0][:-3]  # not 2 x 30 x 4 bytes
    short = _infer_message(rows)
    short.raw_input_contents[0] = short.raw_input_contents[0][:-4]  # one value short
    empty = _infer_message(rows[:0])
    two_sources = _infer_message(rows)
    two_sources.inputs[0].contents.fp32_contents.append(1.0)
    wrong_field = _infer_message(rows, raw=False)
    wrong_field.inputs[0].contents.int64_contents.append(1)
    too_many_rows = _infer_message(np.repeat(rows, 200, axis=0))  # [limits] max_rows = 256
    cases = [
        (_infer_message(out_of_range), "INVALID_ARGUMENT", "out_of_range"),  # 422
        (wrong_size, "INVALID_ARGUMENT", "shape_mismatch"),
        (short, "INVALID_ARGUMENT", "shape_mismatch"),
        (empty, "INVALID_ARGUMENT", "empty_tensor"),
        (two_sources, "INVALID_ARGUMENT", "malformed_binary"),
        (wrong_field, "INVALID_ARGUMENT", "wrong_datatype"),
        (too_many_rows, "RESOURCE_EXHAUSTED", "too_many_rows"),  # 413
        (_infer_message(rows, model="no-such-model"), "NOT_FOUND", "model_not_found"),
        (_infer_message(rows, model="../etc/passwd"), "NOT_FOUND", "route_not_found"),
    ]
    for message, status, code in cases:
        error = _rpc_error(dep, "ModelInfer", message)
        assert (error.code().name, _code(error)) == (status, code), error.details()
        assert "Traceback" not in (error.details() or "")
    # The outsider has a key, but no grant on this model.
    error = _rpc_error(dep, "ModelInfer", _infer_message(rows), "outsider")
    assert (error.code().name, _code(error)) == ("PERMISSION_DENIED", "forbidden")
    # Bytes that are no message at all.
    with grpc.insecure_channel(dep.grpc_url) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as err:
            call(b"\xff\xff\xff", timeout=10)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    # None of it ran the model: the runtime failure counter and the server log show no 500.
    assert "unhandled error" not in dep.server.log_path.read_text()


def test_tritonclient_reads_the_stable_code_and_when_to_retry(dep: GrpcDeployment) -> None:
    # tritonclient.grpc's exception carries the status and its details, never the trailing metadata:
    # with the code there only, RESOURCE_EXHAUSTED "fix the request" (too_many_rows), "retry in 2 s"
    # (rate_limited) and "not today" (quota_exhausted) read alike (red team issue 10, F8).
    client = dep.client()
    rows = dep.rows(2)
    out_of_range = rows.copy()
    out_of_range[0, 0] = 1e9
    for x, headers, status, code in [
        (rows, None, "UNAUTHENTICATED", "unauthenticated"),
        (rows, dep.headers("outsider"), "PERMISSION_DENIED", "forbidden"),
        (out_of_range, dep.headers("analyst"), "INVALID_ARGUMENT", "out_of_range"),
        (np.repeat(rows, 200, axis=0), dep.headers("analyst"), "RESOURCE_EXHAUSTED", "too_many_rows"),
    ]:
        error = _refused(lambda x=x, headers=headers: client.infer(ONNX, [_input(x)], headers=headers))
        assert error.status() == f"StatusCode.{status}"
        assert error.message().endswith(f" ({code})"), error.message()
    tight = {"authorization": f"Bearer {create_key(dep.config, 'tight')}"}  # its own bucket: burst 3
    for _ in range(10):
        try:
            client.get_model_metadata(ONNX, headers=tight)
        except InferenceServerException as e:
            error = e
            break
    assert error.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert re.search(r" \(rate_limited; retry after [1-9][0-9]* s\)$", error.message()), error.message()


def test_oversized_messages_are_resource_exhausted(dep: GrpcDeployment) -> None:
    big = dep.rows(1)
    # Over [limits] max_body_bytes (1 MiB) but within gRPC's limit: the pipeline refuses it, audited.
    over_body = _infer_message(big)
    over_body.id = "x" * (1_048_576 + 100)
    error = _rpc_error(dep, "ModelInfer", over_body)
    assert (error.code().name, _code(error)) == ("RESOURCE_EXHAUSTED", "payload_too_large")
    # Over gRPC's own limit (max_body_bytes + 64 KiB by default): refused before it is read.
    over_grpc = _infer_message(big)
    over_grpc.id = "x" * (1_048_576 + 70_000)
    error = _rpc_error(dep, "ModelInfer", over_grpc)
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]


def test_over_the_rate_is_resource_exhausted_with_retry_after(dep: GrpcDeployment) -> None:
    statuses, retry = [], []
    for _ in range(5):  # the tight role: burst 3, 0.5 a second
        try:
            dep.stub_call("ModelMetadata", pb.ModelMetadataRequest(name=ONNX), "tight")
            statuses.append("OK")
        except grpc.RpcError as e:
            statuses.append(f"{e.code().name} {_code(e)}")  # type: ignore[attr-defined]
            retry.append(int(dict(e.trailing_metadata())["retry-after"]))  # type: ignore[attr-defined]
    assert statuses == ["OK"] * 3 + ["RESOURCE_EXHAUSTED rate_limited"] * 2
    assert all(r >= 1 for r in retry)


def test_zz_every_grpc_request_is_audited_and_the_chain_verifies(dep: GrpcDeployment) -> None:
    _, trailing = dep.stub_call("ModelInfer", _infer_message(dep.rows(1)), "analyst")
    bad = dep.rows(1)
    bad[0, 3] = np.nan
    for message, role in [
        (_infer_message(dep.rows(1), model="no-such-model"), "analyst"),  # 404
        (_infer_message(dep.rows(1)), None),  # 401
        (_infer_message(bad), "analyst"),  # 422
    ]:
        with pytest.raises(grpc.RpcError):
            dep.stub_call("ModelInfer", message, role)
    out = dep.root / "audit.jsonl"
    run_cli("audit", "export", "--config", dep.config, "-o", out)
    records = {r.get("request_id"): r for r in map(json.loads, out.read_text().splitlines())}
    assert records[trailing["x-request-id"]]["route"] == "infer"
    assert records[trailing["x-request-id"]]["payload_hmac"]
    missing = [rid for rid in dep.request_ids if rid not in records]
    assert missing == []
    assert len(dep.request_ids) >= 4
    assert {records[rid]["status"] for rid in dep.request_ids[-4:]} == {200, 401, 404, 422}
    assert run_cli("audit", "verify", "--config", dep.config).returncode == 0


# -- [grpc] settings --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GrpcDeployment]:
    root = tmp_path_factory.mktemp("grpc-tight")
    port = free_port()
    extra = (
        f'[grpc]\nenabled = true\nhost = "127.0.0.1"\nport = {port}\nmax_receive_message_bytes = 40000\n'
        "max_send_message_bytes = 24576\nmax_concurrent_rpcs = 1\nidle_timeout_seconds = 1\n\n"
    )
    config, build = write_test_deployment(root, extra=extra)
    keys = {role: create_key(config, role) for role in ("analyst", "admin")}
    server = start_server(config, root / "server.log")
    yield GrpcDeployment(server, config, root, build, keys, f"127.0.0.1:{port}", [])
    server.stop()


def test_grpc_settings_are_enforced(tight: GrpcDeployment) -> None:
    rows = tight.rows(2)
    # host and port: it answers there.
    assert tight.client().is_server_live()
    # max_receive_message_bytes: 40000, far below the body cap (1 MiB).
    error = _rpc_error(tight, "ModelInfer", _infer_message(np.repeat(tight.rows(1), 400, axis=0)))
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    response, _ = tight.stub_call("ModelInfer", _infer_message(rows), "analyst")
    assert response.outputs[0].name == "label"
    # max_send_message_bytes: 24576 holds max_rows (256) rows of every served model's widest answer
    # (a smaller one is refused at start-up: tests/unit/test_service.py), so 250 rows are answered.
    big = _infer_message(np.repeat(tight.rows(1), 250, axis=0))
    assert big.ByteSize() < 40000
    response, _ = tight.stub_call("ModelInfer", big, "admin")
    assert response.outputs[0].shape == [250]


def test_grpc_concurrency_limit(tight: GrpcDeployment) -> None:
    def call(_: int) -> str:
        try:
            tight.stub_call("ModelInfer", _infer_message(tight.rows(20)), "analyst")
            return "OK"
        except grpc.RpcError as e:
            return str(e.code().name)  # type: ignore[attr-defined]

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(call, range(48)))
    assert "OK" in got and "RESOURCE_EXHAUSTED" in got
    assert set(got) <= {"OK", "RESOURCE_EXHAUSTED"}


def test_an_idle_connection_is_closed(tight: GrpcDeployment) -> None:
    with grpc.insecure_channel(tight.grpc_url) as channel:
        GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=10)
        assert channel._channel.check_connectivity_state(False) == 2  # type: ignore[attr-defined]  # READY
        deadline = time.monotonic() + 5
        while channel._channel.check_connectivity_state(False) == 2 and time.monotonic() < deadline:  # type: ignore[attr-defined]
            time.sleep(0.1)
        assert channel._channel.check_connectivity_state(False) == 0  # type: ignore[attr-defined]  # IDLE: the server sent GOAWAY


def test_grpc_is_off_unless_enabled(tmp_path: Path) -> None:
    config, _ = write_test_deployment(tmp_path)
    server = start_server(config, tmp_path / "server.log")
    try:
        http_port = int(server.base_url.rsplit(":", 1)[1])
        assert _listening_ports(server.process.pid) == {http_port}
    finally:
        server.stop()


def _listening_ports(pid: int) -> set[int]:
    """The TCP ports a process listens on (from /proc: the socket inodes among its descriptors)."""
    fd_dir = Path(f"/proc/{pid}/fd")
    inodes = set()
    for fd in fd_dir.iterdir():
        try:
            target = fd.readlink().name
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


# -- calls that never send their message (red team issue 10, F1) -----------------------------------


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GrpcDeployment]:
    """Eight RPC slots, four of them for one address's calls still waiting for their message, a
    one-second wait for it, 16 connections. On "localhost": IPv4 and IPv6 loopback are two client
    addresses."""
    root = tmp_path_factory.mktemp("grpc-guarded")
    port = free_port()
    extra = (
        f'[grpc]\nenabled = true\nhost = "localhost"\nport = {port}\nmax_concurrent_rpcs = 8\n'
        "message_timeout_seconds = 1\nmax_waiting_rpcs_per_address = 4\nmax_connections = 16\n\n"
    )
    config, build = write_test_deployment(root, extra=extra)
    keys = {role: create_key(config, role) for role in ("analyst",)}
    server = start_server(config, root / "server.log")
    yield GrpcDeployment(server, config, root, build, keys, f"127.0.0.1:{port}", [])
    server.stop()


def _raw_call(channel: grpc.Channel, method: str = "ModelInfer") -> Any:
    """The RPC as a client-streaming call: the client decides how many messages it sends (none)."""
    return channel.stream_unary(
        f"/inference.GRPCInferenceService/{method}",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )


def _held(release: threading.Event) -> Iterable[bytes]:
    """Headers sent, then no message until `release`, then the end of the stream."""
    release.wait()
    yield from ()


def test_a_call_that_never_sends_its_message_is_cut_off(guarded: GrpcDeployment) -> None:
    release = threading.Event()
    with grpc.insecure_channel(guarded.grpc_url) as channel:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            _raw_call(channel)(_held(release), timeout=20)
        elapsed = time.monotonic() - started
        release.set()
        assert (err.value.code().name, _code(err.value)) == ("DEADLINE_EXCEEDED", "request_timeout")  # type: ignore[attr-defined]
        assert elapsed < 5  # message_timeout_seconds = 1, not the client's 20
        # A call that ends its stream without any message is refused at once, not left waiting.
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            _raw_call(channel, "ServerLive")(iter(()), timeout=20)
        assert (err.value.code().name, _code(err.value)) == ("INVALID_ARGUMENT", "malformed_request")  # type: ignore[attr-defined]
        assert time.monotonic() - started < 5
        # The same channel still serves a whole call.
        response, _ = guarded.stub_call("ModelInfer", _infer_message(guarded.rows(1)), "analyst")
        assert response.outputs[0].name == "label"


def test_one_address_cannot_hold_every_rpc_slot(guarded: GrpcDeployment) -> None:
    release = threading.Event()
    attacker = grpc.insecure_channel(guarded.grpc_url)  # 127.0.0.1
    try:
        held = [_raw_call(attacker).future(_held(release), timeout=30) for _ in range(12)]
        deadline = time.monotonic() + 5
        while sum(f.done() for f in held) < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        # Past its address's four, each of the attacker's calls is refused at once ...
        refused = [f.exception() for f in held if f.done()]
        assert len(refused) == 8
        assert {(e.code().name, _code(e)) for e in refused} == {("RESOURCE_EXHAUSTED", "too_many_in_flight")}  # type: ignore[union-attr]
        # ... and the server's eight slots are not all taken: another address is served meanwhile.
        port = guarded.grpc_url.rsplit(":", 1)[1]
        with grpc.insecure_channel(f"[::1]:{port}") as victim:
            stub = GRPCInferenceServiceStub(victim)
            assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
            metadata = (("authorization", f"Bearer {guarded.keys['analyst']}"),)
            response = stub.ModelInfer(_infer_message(guarded.rows(1)), metadata=metadata, timeout=10)
            assert response.outputs[0].name == "label"
    finally:
        release.set()
        attacker.close()


def test_connections_past_max_connections_are_closed_at_once(guarded: GrpcDeployment) -> None:
    # Connections that send HTTP/2's preface and nothing else stayed for idle_timeout_seconds (60) each,
    # without bound: enough of them took every file descriptor of the process (red team issue 10, F11).
    host, port = guarded.grpc_url.rsplit(":", 1)
    socks = []
    try:
        for _ in range(40):
            sock = socket.create_connection((host, int(port)), timeout=5)
            sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000"))
            socks.append(sock)
        time.sleep(1.5)
        closed = 0
        for sock in socks:
            sock.setblocking(False)
            try:
                closed += sock.recv(65536) == b""
            except BlockingIOError:
                pass
            except OSError:
                closed += 1
        assert closed >= 40 - 16
    finally:
        for sock in socks:
            sock.close()
    time.sleep(0.5)
    assert guarded.client().is_server_live()  # served again once they are gone
