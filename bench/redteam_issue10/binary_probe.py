"""Hostile binary-extension bodies (raw HTTP), each printed with its status and code, beside the JSON
twin where there is one. Nothing here may be a 5xx or reach the model.

    .venv/bin/python bench/redteam_issue10/binary_probe.py
"""

from __future__ import annotations

import json
import struct

import httpx
import numpy as np
from common import demo
from sklearn.datasets import load_breast_cancer

d = demo()
ROW = load_breast_cancer().data[:1].astype("<f4")
RAW = ROW.tobytes()
URL = d.url("/v2/models/breast-cancer/infer")


def framed(header: dict | bytes, raw: bytes = RAW, length: int | str | None = None, **hdrs: str):
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    h = {"Inference-Header-Content-Length": str(len(text) if length is None else length), **hdrs}
    return text + raw, h


def feat(size: int | None = len(RAW), shape=(1, 30), datatype="FP32", **extra):
    params = {} if size == "absent" else {"binary_data_size": size}
    return {"name": "features", "shape": list(shape), "datatype": datatype, "parameters": params, **extra}


def send(name: str, body: bytes, headers: dict, role: str = "analyst", url: str = URL) -> None:
    r = httpx.post(url, content=body, headers={**d.auth(role), **headers}, timeout=30)
    try:
        code = r.json().get("code")
    except ValueError:
        code = r.headers.get("content-type")
    flag = "  <-- 5xx!" if r.status_code >= 500 else ""
    print(f"{name:55} {r.status_code} {code}{flag}")
    if r.status_code == 200:
        print("      ", r.headers.get("content-type"), r.content[:160])


send("control", *framed({"inputs": [feat()]}))
send("binary_data_size null", *framed({"inputs": [feat(None)]}))
send("binary_data_size 120.0 (float)", *framed({"inputs": [feat(120.0)]}))
send("binary_data_size 2**70", *framed({"inputs": [feat(2**70)]}))
send("header length 20 nines", *framed({"inputs": [feat()]}, length="9" * 20))
send("header length 21 digits", *framed({"inputs": [feat()]}, length="0" * 18 + "100"))
send("header length '+100'", *framed({"inputs": [feat()]}, length="+100"))
send("header length ' 5'", *framed({"inputs": [feat()]}, length="1e2"))
hdr = json.dumps({"inputs": [feat()]}).encode()
body = hdr + RAW
r = httpx.post(
    URL,
    content=body,
    headers=[
        ("Authorization", d.auth()["Authorization"]),
        ("Inference-Header-Content-Length", str(len(hdr))),
        ("Inference-Header-Content-Length", "3"),
    ],
)
code = r.json().get("code") if r.status_code != 200 else "ok"
print(f"{'two header-length headers (good, then 3)':55} {r.status_code} {code}")
send(
    "BYTES prefix 0xFFFFFFFF",
    *framed({"inputs": [feat(8, (1, 1), "BYTES")]}, struct.pack("<II", 0xFFFFFFFF, 0)),
)
send(
    "BYTES 250k empty elements",
    *framed({"inputs": [feat(4 * 250_000, (250_000, 1), "BYTES")]}, b"\0" * 1_000_000),
)
send("FP16 raw", *framed({"inputs": [feat(60, datatype="FP16")]}, RAW[:60]))
send("BOOL byte 2", *framed({"inputs": [feat(30, datatype="BOOL")]}, b"\2" * 30))
send(
    "output not in manifest (binary)",
    *framed({"inputs": [feat()], "outputs": [{"name": "secret", "parameters": {"binary_data": True}}]}),
)
send(
    "output not in manifest (JSON twin)",
    json.dumps(
        {
            "inputs": [
                {"name": "features", "shape": [1, 30], "datatype": "FP32", "data": ROW.ravel().tolist()}
            ],
            "outputs": [{"name": "secret"}],
        }
    ).encode(),
    {"Content-Type": "application/json"},
)
send(
    "ungranted output, binary",
    *framed(
        {"inputs": [feat()], "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]}
    ),
)
send(
    "label twice, binary",
    *framed(
        {
            "inputs": [feat()],
            "outputs": [{"name": "label", "parameters": {"binary_data": True}}, {"name": "label"}],
        }
    ),
)
send(
    "label twice (JSON twin)",
    json.dumps(
        {
            "inputs": [
                {"name": "features", "shape": [1, 30], "datatype": "FP32", "data": ROW.ravel().tolist()}
            ],
            "outputs": [{"name": "label"}, {"name": "label"}],
        }
    ).encode(),
    {},
)
send(
    "binary_data_output, admin",
    *framed({"inputs": [feat()], "parameters": {"binary_data_output": True}}),
    role="admin",
)
send(
    "outputs binary_data: 1",
    *framed({"inputs": [feat()], "outputs": [{"name": "label", "parameters": {"binary_data": 1}}]}),
)
send(
    "binary_data_output on aggregate",
    *framed({"inputs": [feat(len(RAW) * 1, (1, 10))]}, np.zeros(10, "<f4").tobytes()),
    url=d.url("/v2/models/diabetes/aggregate"),
)
send(
    "header on metadata GET route (POST)",
    *framed({"inputs": [feat()]}),
    url=d.url("/v2/models/breast-cancer"),
)
send(
    "header on token route", *framed({"scope": ["infer:breast-cancer"]}, b"junk"), url=d.url("/v2/auth/token")
)
send(
    "binary input on diabetes, admin (FP64 output binary)",
    *framed(
        {"inputs": [feat(40, (1, 10))], "parameters": {"binary_data_output": True}},
        np.zeros(10, "<f4").tobytes(),
    ),
    role="admin",
    url=d.url("/v2/models/diabetes/infer"),
)
send("binary, no auth", *framed({"inputs": [feat()]}), role="none")
