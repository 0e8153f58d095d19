"""REST JSON, REST binary and gRPC (Open Inference Protocol V2) side by side, with every defense on
and against a bare app, in one run.

One demo build, two servers (defended, with bench/load.py's policy: the shipped audit durability,
SQLite state, query auditing alerting; bare: `--unsafe-no-defenses`), each serving REST and gRPC from
one process pinned to CPU 0; the load generator is pinned to CPU 1, as bench/load.py pins server and
wrk. The generator is one Python process for all three, so none has a faster client: asyncio streams
for REST (the V2 JSON body; the binary extension's body with `binary_data_output`, as tritonclient and
the KServe SDK send by default), grpc.aio with the generated stub and raw tensors for gRPC. All three
answers are checked equal before timing; rounds rotate server and transport order so drift hits all
six. Prints requests/s, p50, p99 and server CPU per request, medians.

    .venv/bin/python bench/transports.py [--seconds 5] [--rounds 3] [--concurrency 16] [--rows 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.load import bench_policy, cpu_seconds, create_key, free_port  # noqa: E402

from bastion.demo import build_demo, infer_request  # noqa: E402
from bastion.grpc import grpc_predict_v2_pb2 as pb  # noqa: E402
from bastion.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub  # noqa: E402

MODEL = "breast-cancer"
TRANSPORTS = ("REST JSON", "REST binary", "gRPC")


def serve(config: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    cmd = ["taskset", "-c", "0", sys.executable, "-m", "bastion.cli", "serve", "--config", str(config)]
    return subprocess.Popen(
        [*cmd, "--port", str(port), "--log-level", "warning", *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def wait_ready(port: int) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"server on {port} did not become ready")


def binary_body(rows: np.ndarray) -> tuple[bytes, int]:
    """The binary extension's body (JSON header, raw FP32 rows; answers asked back binary, as
    tritonclient asks by default) and its header's length. The same body as bench/binary.py's."""
    raw = rows.astype("<f4").tobytes()
    features = {"name": "features", "shape": list(rows.shape), "datatype": "FP32"}
    header = {
        "inputs": [{**features, "parameters": {"binary_data_size": len(raw)}}],
        "parameters": {"binary_data_output": True},
    }
    text = json.dumps(header).encode()
    return text + raw, len(text)


def rest_request(kind: str, rows: np.ndarray, key: str) -> bytes:
    """One whole HTTP/1.1 request, head and body: the V2 JSON body or the binary extension's."""
    if kind == "REST JSON":
        body, headers = (
            httpx.Request("POST", "/", json=infer_request(rows)).content,
            "Content-Type: application/json",
        )
    else:
        body, header_length = binary_body(rows)
        headers = (
            f"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: {header_length}"
        )
    head = (
        f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
        f"{headers}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def rest_worker(port: int, request: bytes, stop: float, lat: list[float]) -> None:
    # One write per request on a kept-alive connection, as wrk sends: httpx writes head and body
    # apart, and Nagle's algorithm then holds the body for the server's delayed ACK (~40 ms).
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < stop:
            t = time.perf_counter()
            writer.write(request)
            status = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            assert status.split()[1] == b"200", status
            lat.append(time.perf_counter() - t)
    finally:
        writer.close()


def grpc_message(rows: np.ndarray) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name=MODEL)
    message.inputs.add(name="features", datatype="FP32", shape=list(rows.shape))
    message.raw_input_contents.append(rows.astype("<f4").tobytes())
    return message


async def grpc_worker(target: str, rows: np.ndarray, key: str, stop: float, lat: list[float]) -> None:
    message = grpc_message(rows)
    metadata = (("authorization", f"Bearer {key}"),)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        while time.perf_counter() < stop:
            t = time.perf_counter()
            await stub.ModelInfer(message, metadata=metadata, timeout=30)
            lat.append(time.perf_counter() - t)


def run(
    kind: str, port: int, grpc_port: int, rows: np.ndarray, key: str, seconds: float, n: int
) -> list[float]:
    lat: list[float] = []

    async def go() -> None:
        stop = time.perf_counter() + seconds
        if kind != "gRPC":
            request = rest_request(kind, rows, key)
            await asyncio.gather(*(rest_worker(port, request, stop, lat) for _ in range(n)))
        else:
            target = f"127.0.0.1:{grpc_port}"
            await asyncio.gather(*(grpc_worker(target, rows, key, stop, lat) for _ in range(n)))

    asyncio.run(go())
    return lat


def answers(port: int, grpc_port: int, rows: np.ndarray, key: str) -> dict[str, dict[str, list[Any]]]:
    """Each transport's answer to `rows`, by output name (labels as text, scores as floats)."""
    got: dict[str, dict[str, list[Any]]] = {}
    for kind in ("REST JSON", "REST binary"):
        head, _, body = rest_request(kind, rows, key).partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:])
        r = httpx.post(f"http://127.0.0.1:{port}/v2/models/{MODEL}/infer", content=body, headers=headers)
        if r.status_code != 200:
            raise SystemExit(f"setup: {kind} answered {r.status_code}: {r.text[:200]}")
        if kind == "REST JSON":
            got[kind] = {o["name"]: o["data"] for o in r.json()["outputs"]}
            continue
        length = int(r.headers["inference-header-content-length"])
        at, got[kind] = length, {}
        for output in json.loads(r.content[:length])["outputs"]:
            size = output["parameters"]["binary_data_size"]
            got[kind][output["name"]] = _decode(output["datatype"], r.content[at : at + size])
            at += size
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        response = GRPCInferenceServiceStub(channel).ModelInfer(  # type: ignore[no-untyped-call]
            grpc_message(rows), metadata=(("authorization", f"Bearer {key}"),), timeout=30
        )
    got["gRPC"] = {
        o.name: _decode(o.datatype, raw)
        for o, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }
    return got


def _decode(datatype: str, raw: bytes) -> list[Any]:
    if datatype != "BYTES":
        return list(np.frombuffer(raw, dtype="<f4").tolist())
    out, at = [], 0
    while at < len(raw):  # BYTES: each element a 4-byte little-endian length, then its bytes
        size = int.from_bytes(raw[at : at + 4], "little")
        out.append(raw[at + 4 : at + 4 + size].decode())
        at += 4 + size
    return out


def check_same_answer(port: int, grpc_port: int, rows: np.ndarray, key: str) -> None:
    """The three transports must give one answer before their speeds are compared."""
    got = answers(port, grpc_port, rows, key)
    want = got["REST JSON"]
    for kind, answer in got.items():
        same = answer.keys() == want.keys() and all(
            answer[n] == want[n]
            if isinstance(want[n][0], str)
            else np.allclose(answer[n], want[n], atol=1e-6)
            for n in want
        )
        if not same:
            raise SystemExit(f"setup: the {kind} answer {answer} is not the JSON answer {want}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rows", type=int, default=1)
    args = parser.parse_args()
    os.sched_setaffinity(0, {1})  # the load generator on CPU 1, the servers on CPU 0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build = build_demo(root / "demo", port=0)
        grpc_ports = {"defended": free_port(), "bare": free_port()}
        # bench/load.py's policy: the bench role, and query auditing alerting only (the same row
        # every time would rightly get the key quarantined).
        text = bench_policy(build.config_path)
        configs = {}
        for name, gport in grpc_ports.items():
            path = root / "demo" / f"{name}.toml"
            # Each server its own state directory (one server per directory) and its own key.
            own = text.replace('state_dir = "state"', f'state_dir = "state-{name}"')
            path.write_text(f"{own}\n[grpc]\nenabled = true\nport = {gport}\n")
            configs[name] = path
        keys = {name: create_key(path) for name, path in configs.items()}
        rows = np.asarray(build.features[: args.rows], dtype=np.float32)
        ports = {name: free_port() for name in configs}
        procs = {
            "defended": serve(configs["defended"], ports["defended"]),
            "bare": serve(configs["bare"], ports["bare"], "--unsafe-no-defenses"),
        }
        results: dict[tuple[str, str], list[dict[str, float]]] = {}
        try:
            for name in procs:
                wait_ready(ports[name])
                check_same_answer(ports[name], grpc_ports[name], rows, keys[name])
                for kind in TRANSPORTS:  # warm-up
                    run(kind, ports[name], grpc_ports[name], rows, keys[name], 1, 4)
            for r in range(args.rounds):
                for name in procs:
                    order = TRANSPORTS[r % 3 :] + TRANSPORTS[: r % 3]  # each transport first once in 3
                    for kind in order:
                        cpu, mine = cpu_seconds(procs[name].pid), time.process_time()
                        lat = run(
                            kind,
                            ports[name],
                            grpc_ports[name],
                            rows,
                            keys[name],
                            args.seconds,
                            args.concurrency,
                        )
                        used = cpu_seconds(procs[name].pid) - cpu
                        client = time.process_time() - mine
                        lat.sort()
                        res = {
                            "rps": len(lat) / args.seconds,
                            "p50": lat[len(lat) // 2] * 1000,
                            "p99": lat[int(len(lat) * 0.99)] * 1000,
                            "cpu_us": used / len(lat) * 1e6,
                            # Busy share of each core: near 100 % names the side that set the pace.
                            "server_busy": used / args.seconds * 100,
                            "client_busy": client / args.seconds * 100,
                        }
                        results.setdefault((name, kind), []).append(res)
                        print(
                            f"round {r + 1} {name:8s} {kind:11s} {res['rps']:7.0f} req/s  p50 {res['p50']:6.2f} ms"
                            f"  p99 {res['p99']:6.2f} ms  server CPU {res['cpu_us']:5.0f} us/req"
                            f"  busy: server {res['server_busy']:3.0f} %, client {res['client_busy']:3.0f} %",
                            flush=True,
                        )
        finally:
            for proc in procs.values():
                proc.terminate()
                proc.wait(timeout=30)
    print(
        f"\nmedians of {args.rounds} rounds, {args.seconds:g} s each, {args.concurrency} concurrent, "
        f"{args.rows} row(s):\n"
    )
    print("| server | transport | req/s | p50 ms | p99 ms | server CPU µs/req | busy: server / client % |")
    print("|---|---|---|---|---|---|---|")
    medians: dict[tuple[str, str], dict[str, float]] = {}
    for name in ("defended", "bare"):
        for kind in TRANSPORTS:
            runs = results[(name, kind)]
            med = {f: statistics.median(r[f] for r in runs) for f in runs[0]}
            medians[(name, kind)] = med
            print(
                f"| {name} | {kind} | {med['rps']:.0f} | {med['p50']:.2f} | {med['p99']:.2f} | {med['cpu_us']:.0f} "
                f"| {med['server_busy']:.0f} / {med['client_busy']:.0f} |"
            )
    print(
        "\ndefenses' cost per transport (defended minus bare, server CPU µs/req): "
        + ", ".join(
            f"{kind} {medians[('defended', kind)]['cpu_us'] - medians[('bare', kind)]['cpu_us']:+.0f}"
            for kind in TRANSPORTS
        )
    )


if __name__ == "__main__":
    main()
