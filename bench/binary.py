"""REST JSON vs REST binary tensors, every defense on, side by side in one run.

One defended server (the demo's breast-cancer ONNX model, pinned to CPU 0; wrk on CPU 1, as
bench/load.py pins them) answers both encodings of the same request in turn, the order alternating
by round so drift hits both: the V2 JSON body, and the binary extension's body (JSON header, raw
FP32 rows, `binary_data_output` so the answer comes back binary too, as tritonclient asks by
default). Prints requests/s, p50, p99 and server CPU per request for each, and the ratio.

    .venv/bin/python bench/binary.py [--seconds 10] [--rounds 3] [--connections 16] [--rows 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from load import bench_policy, cpu_seconds, create_key, free_port, run_wrk, start  # noqa: E402

from bastion.demo import build_demo, infer_request  # noqa: E402


def binary_body(rows: np.ndarray) -> tuple[bytes, int]:
    raw = rows.astype("<f4").tobytes()
    header = {
        "inputs": [
            {
                "name": "features",
                "shape": list(rows.shape),
                "datatype": "FP32",
                "parameters": {"binary_data_size": len(raw)},
            }
        ],
        "parameters": {"binary_data_output": True},
    }
    text = json.dumps(header).encode()
    return text + raw, len(text)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rows", type=int, default=1, help="rows per request")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: `apt-get install wrk` (make bench does it)")

    work = Path(tempfile.mkdtemp(prefix="bastion-bench-binary-"))
    build = build_demo(work / "demo")
    # As bench/load.py: query auditing on but alerting only (the same row every time would rightly
    # quarantine the key), the shipped audit durability (fsync) and SQLite state.
    text = bench_policy(build.config_path)
    build.config_path.write_text(text)
    rows = np.asarray(build.features[: args.rows], dtype=np.float32)
    json_body = work / "request.json"
    json_body.write_text(json.dumps(infer_request(rows)))
    raw, header_length = binary_body(rows)
    bin_body = work / "request.bin"
    bin_body.write_bytes(raw)
    os.environ["BASTION_BENCH_HEADER_LENGTH"] = str(header_length)
    key = create_key(build.config_path)

    encodings = [("REST JSON", json_body, "infer.lua"), ("REST binary", bin_body, "infer_binary.lua")]
    results: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in encodings}
    for rnd in range(args.rounds):
        port = free_port()
        proc = start(build.config_path, port)
        url = f"http://127.0.0.1:{port}/v2/models/breast-cancer/infer"
        try:
            _check_same_answer(url, key, json_body, raw, header_length)
            order = encodings if rnd % 2 == 0 else encodings[::-1]
            for name, body, script in order:
                run_wrk(url, body, key, 2, args.connections, script)  # warm-up
                cpu_before = cpu_seconds(proc.pid)
                r = run_wrk(url, body, key, args.seconds, args.connections, script)
                r["cpu_us"] = (cpu_seconds(proc.pid) - cpu_before) / (r["rps"] * args.seconds) * 1e6
                if r["errors"]:
                    raise SystemExit(f"{name}: {int(r['errors'])} non-2xx responses: the comparison is void")
                results[name].append(r)
                print(
                    f"round {rnd + 1} {name:>12}: {r['rps']:8.0f} req/s  p50 {r['p50']:6.2f} ms  "
                    f"p99 {r['p99']:6.2f} ms  server CPU {r['cpu_us']:5.0f} us/req",
                    flush=True,
                )
        finally:
            proc.terminate()
            proc.wait()

    def med(name: str, field: str) -> float:
        return statistics.median(r[field] for r in results[name])

    base, other = (name for name, _, _ in encodings)
    print()
    print(f"{'':18}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'CPU us/req':>12}")
    for name in (base, other):
        print(
            f"{name:<18}{med(name, 'rps'):>10.0f}{med(name, 'p50'):>10.2f}{med(name, 'p99'):>10.2f}"
            f"{med(name, 'cpu_us'):>12.0f}"
        )
    label = "ratio binary/JSON"
    print(
        f"{label:<18}{med(other, 'rps') / med(base, 'rps'):>10.3f}"
        f"{med(other, 'p50') / med(base, 'p50'):>10.2f}{med(other, 'p99') / med(base, 'p99'):>10.2f}"
        f"{med(other, 'cpu_us') / med(base, 'cpu_us'):>12.2f}"
    )
    print(
        f"\n(median of {args.rounds} rounds of {args.seconds} s, {args.connections} connections, "
        f"{args.rows} row(s) per request, every defense on, audit fsync, state sqlite; "
        f"bodies {json_body.stat().st_size} B JSON, {len(raw)} B binary; server on CPU 0, wrk on CPU 1)"
    )
    shutil.rmtree(work, ignore_errors=True)


def _check_same_answer(url: str, key: str, json_body: Path, raw: bytes, header_length: int) -> None:
    """Both encodings must give one answer before their speeds are compared."""
    auth = {"Authorization": f"Bearer {key}"}
    a = httpx.post(url, content=json_body.read_bytes(), headers={**auth, "Content-Type": "application/json"})
    b = httpx.post(url, content=raw, headers={**auth, "Inference-Header-Content-Length": str(header_length)})
    if a.status_code != 200 or b.status_code != 200:
        raise SystemExit(
            f"setup: JSON {a.status_code}, binary {b.status_code}: {a.text[:200]} {b.text[:200]}"
        )
    want = {o["name"]: o["data"] for o in a.json()["outputs"]}
    length = int(b.headers["inference-header-content-length"])
    at, got = length, {}
    for output in json.loads(b.content[:length])["outputs"]:
        size = output["parameters"]["binary_data_size"]
        chunk, at = b.content[at : at + size], at + size
        if output["datatype"] == "BYTES":
            got[output["name"]] = [s.decode() for s in _elements(chunk)]
        else:
            got[output["name"]] = np.frombuffer(chunk, dtype="<f4").tolist()
    if got.keys() != want.keys() or got["label"] != want["label"]:
        raise SystemExit(f"setup: the binary answer {got} is not the JSON answer {want}")


def _elements(chunk: bytes) -> list[bytes]:
    out, at = [], 0
    while at < len(chunk):
        size = int.from_bytes(chunk[at : at + 4], "little")
        out.append(chunk[at + 4 : at + 4 + size])
        at += 4 + size
    return out


if __name__ == "__main__":
    main()
