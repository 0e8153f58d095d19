"""A client's bad input that reaches the runtime: NaN / Infinity in a float tensor (JSON literal `NaN`,
and the binary tensor extension). Does it get a 4xx before the runtime, or a 500 that moves the breaker?"""

from __future__ import annotations

import json
import struct
import sys
import tempfile
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tests.helpers import create_key, start_server, write_test_deployment


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="rt-nan-")) / "d"
    config, build = write_test_deployment(root)
    key = create_key(config, "admin")
    server = start_server(config, root.parent / "server.log")
    h = {"Authorization": f"Bearer {key}"}
    try:
        row = [float(x) for x in np.asarray(build.features[0], dtype=np.float32)]
        for model in ("breast-cancer", "breast-cancer-skops", "diabetes", "loan"):
            meta = httpx.get(f"{server.base_url}/v2/models/{model}", headers=h).json()
            inputs = meta["inputs"]
            for bad in ("NaN", "Infinity", "-Infinity"):
                parts = []
                for spec in inputs:
                    width = spec["shape"][1]
                    if spec["datatype"].startswith("FP"):
                        vals = [bad] + ["0.0"] * (width - 1)
                    else:
                        vals = ["0"] * width
                    parts.append(
                        '{"name": "%s", "datatype": "%s", "shape": [1, %d], "data": [%s]}'
                        % (spec["name"], spec["datatype"], width, ", ".join(vals))
                    )
                body = '{"inputs": [' + ", ".join(parts) + "]}"
                r = httpx.post(
                    f"{server.base_url}/v2/models/{model}/infer",
                    content=body,
                    headers={**h, "content-type": "application/json"},
                )
                print(f"{model:20s} JSON {bad:10s} -> {r.status_code} {r.text[:110]}")
            # binary extension: the first FP32 input's first value NaN
            spec = next(s for s in inputs if s["datatype"].startswith("FP"))
            width = spec["shape"][1]
            data = struct.pack(f"<{width}f", float("nan"), *([0.0] * (width - 1)))
            others = [s for s in inputs if s is not spec]
            desc = [
                {
                    "name": spec["name"],
                    "datatype": "FP32",
                    "shape": [1, width],
                    "parameters": {"binary_data_size": len(data)},
                }
            ]
            desc += [
                {
                    "name": s["name"],
                    "datatype": s["datatype"],
                    "shape": [1, s["shape"][1]],
                    "data": [0] * s["shape"][1],
                }
                for s in others
            ]
            head = json.dumps({"inputs": desc}).encode()
            r = httpx.post(
                f"{server.base_url}/v2/models/{model}/infer",
                content=head + data,
                headers={
                    **h,
                    "content-type": "application/octet-stream",
                    "Inference-Header-Content-Length": str(len(head)),
                },
            )
            print(f"{model:20s} binary NaN    -> {r.status_code} {r.text[:110]}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
