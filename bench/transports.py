"""REST JSON against gRPC (Open Inference Protocol V2), with every defense on and against a bare app.

One demo build, two servers (defended; `--unsafe-no-defenses`), each serving REST and gRPC from one
process pinned to CPU 0; the load generator (Python: asyncio streams for REST, grpc.aio with the generated stub
and raw tensors, as tritonclient sends them, for gRPC) is pinned to CPU 1. Rounds alternate server and
transport so drift hits all four. Prints requests/s, p50, p99 and server CPU per request, medians.

    .venv/bin/python bench/transports.py [--seconds 5] [--rounds 3] [--concurrency 16] [--rows 1]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.load import BENCH_ROLE, cpu_seconds, create_key, free_port  # noqa: E402

from bastion.demo import build_demo, infer_request  # noqa: E402

MODEL = "breast-cancer"
BASTION = [sys.executable, "-m", "bastion.cli"]


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


async def rest_worker(port: int, body: bytes, key: str, stop: float, lat: list[float]) -> None:
    # One write per request on a kept-alive connection, as wrk sends: httpx writes head and body
    # apart, and Nagle's algorithm then holds the body for the server's delayed ACK (~40 ms).
    head = (
        f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < stop:
            t = time.perf_counter()
            writer.write(head + body)
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


async def grpc_worker(target: str, rows: np.ndarray, key: str, stop: float, lat: list[float]) -> None:
    import grpc

    from bastion.grpc import grpc_predict_v2_pb2 as pb
    from bastion.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

    message = pb.ModelInferRequest(model_name=MODEL)
    message.inputs.add(name="features", datatype="FP32", shape=list(rows.shape))
    message.raw_input_contents.append(rows.astype("<f4").tobytes())
    metadata = (("authorization", f"Bearer {key}"),)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = GRPCInferenceServiceStub(channel)
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
        if kind == "rest":
            body = httpx.Request("POST", "/", json=infer_request(rows)).content
            await asyncio.gather(*(rest_worker(port, body, key, stop, lat) for _ in range(n)))
        else:
            target = f"127.0.0.1:{grpc_port}"
            await asyncio.gather(*(grpc_worker(target, rows, key, stop, lat) for _ in range(n)))

    asyncio.run(go())
    return lat


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
        config = build.config_path
        grpc_ports = {"defended": free_port(), "bare": free_port()}
        text = config.read_text()
        configs = {}
        for name, gport in grpc_ports.items():
            path = root / "demo" / f"{name}.toml"
            # Each server its own state directory (one server per directory) and its own key.
            own = text.replace('state_dir = "state"', f'state_dir = "state-{name}"')
            path.write_text(f"{own}\n[grpc]\nenabled = true\nport = {gport}\n{BENCH_ROLE}")
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
                run("rest", ports[name], grpc_ports[name], rows, keys[name], 1, 4)  # warm-up
                run("grpc", ports[name], grpc_ports[name], rows, keys[name], 1, 4)
            for r in range(args.rounds):
                for name in procs:
                    for kind in ("rest", "grpc") if r % 2 == 0 else ("grpc", "rest"):
                        cpu = cpu_seconds(procs[name].pid)
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
                        lat.sort()
                        res = {
                            "rps": len(lat) / args.seconds,
                            "p50": lat[len(lat) // 2] * 1000,
                            "p99": lat[int(len(lat) * 0.99)] * 1000,
                            "cpu_us": used / len(lat) * 1e6,
                        }
                        results.setdefault((name, kind), []).append(res)
                        print(
                            f"round {r + 1} {name:8s} {kind:4s} {res['rps']:7.0f} req/s  p50 {res['p50']:6.2f} ms"
                            f"  p99 {res['p99']:6.2f} ms  server CPU {res['cpu_us']:5.0f} us/req",
                            flush=True,
                        )
        finally:
            for proc in procs.values():
                proc.terminate()
                proc.wait(timeout=30)
    print(
        f"\nmedians of {args.rounds} rounds, {args.seconds:g} s each, {args.concurrency} concurrent, "
        f"{args.rows} row(s):"
    )
    print(f"{'server':10s}{'transport':>10s}{'req/s':>9s}{'p50 ms':>9s}{'p99 ms':>9s}{'CPU us/req':>12s}")
    for (name, kind), runs in results.items():
        med = {f: statistics.median(r[f] for r in runs) for f in ("rps", "p50", "p99", "cpu_us")}
        print(
            f"{name:10s}{kind:>10s}{med['rps']:9.0f}{med['p50']:9.2f}{med['p99']:9.2f}{med['cpu_us']:12.0f}"
        )


if __name__ == "__main__":
    main()
