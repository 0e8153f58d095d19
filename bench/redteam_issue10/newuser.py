"""A new user follows the README's "gRPC" and "HTTP API" sections with tritonclient (http, grpc) at
their default settings, then compares every demo model's answer with the JSON path's.

    .venv/bin/python bench/redteam_issue10/newuser.py
"""

from __future__ import annotations

import json

import httpx
import numpy as np
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from common import demo
from sklearn.datasets import load_breast_cancer, load_diabetes
from tritonclient.utils import InferenceServerException

d = demo()
print("demo", d.http, d.grpc)
MODELS = {
    "breast-cancer": load_breast_cancer().data[:2].astype(np.float32),
    "breast-cancer-skops": load_breast_cancer().data[:2].astype(np.float32),
    "diabetes": load_diabetes().data[:2].astype(np.float32),
}


def json_path(model: str, rows: np.ndarray, role: str, outputs: list[str] | None = None) -> dict:
    body: dict = {
        "id": "x",
        "inputs": [
            {"name": "features", "datatype": "FP32", "shape": list(rows.shape), "data": rows.ravel().tolist()}
        ],
    }
    if outputs:
        body["outputs"] = [{"name": o} for o in outputs]
    r = httpx.post(d.url(f"/v2/models/{model}/infer"), json=body, headers=d.auth(role))
    return {"status": r.status_code, **r.json()}


# README "gRPC", exactly.
client = tgrpc.InferenceServerClient(d.grpc)
auth = {"authorization": f"Bearer {d.analyst}"}
rows = MODELS["breast-cancer"]
features = tgrpc.InferInput("features", list(rows.shape), "FP32")
features.set_data_from_numpy(rows)
result = client.infer("breast-cancer", [features], request_id="demo-1", headers=auth)
print("README gRPC:", result.as_numpy("label"))
# README "Binary tensors", exactly.
hclient = thttp.InferenceServerClient(d.http)
hauth = {"Authorization": f"Bearer {d.analyst}"}
hfeatures = thttp.InferInput("features", list(rows.shape), "FP32")
hfeatures.set_data_from_numpy(rows)
hresult = hclient.infer("breast-cancer", [hfeatures], headers=hauth, request_id="demo-1")
print("README HTTP:", hresult.get_response()["id"], hresult.as_numpy("label"))

problems = []
for role in ("analyst", "admin"):
    h = d.auth(role)
    gh = {"authorization": h["Authorization"]}
    for model, rows in MODELS.items():
        ref = json_path(model, rows, role)
        hi = thttp.InferInput("features", list(rows.shape), "FP32")
        hi.set_data_from_numpy(rows)
        gi = tgrpc.InferInput("features", list(rows.shape), "FP32")
        gi.set_data_from_numpy(rows)
        try:
            hr = hclient.infer(model, [hi], headers=h, request_id="x")
            gr = client.infer(model, [gi], headers=gh, request_id="x")
        except InferenceServerException as e:
            problems.append(f"{role} {model}: {e}")
            continue
        for out in ref.get("outputs", []):
            want = np.asarray(out["data"])
            got_h, got_g = hr.as_numpy(out["name"]), gr.as_numpy(out["name"])
            if got_h is None or got_g is None:
                problems.append(f"{role} {model} {out['name']}: missing http={got_h} grpc={got_g}")
                continue
            if out["datatype"] == "BYTES":
                ok = (
                    [x.decode() for x in got_h.ravel()]
                    == list(want.ravel())
                    == [x.decode() for x in got_g.ravel()]
                )
            elif model == "diabetes" and role == "analyst":
                ok = got_h.shape == want.shape == got_g.shape  # DP noise
            else:
                ok = np.allclose(got_h.ravel(), want.ravel()) and np.allclose(got_g.ravel(), want.ravel())
            print(f"{role:8} {model:20} {out['name']:14} json/http/grpc equal: {ok}")
            if not ok:
                problems.append(f"{role} {model} {out['name']}: {want} vs {got_h} vs {got_g}")
        names_h = [o["name"] for o in hr.get_response()["outputs"]]
        names_g = [o.name for o in gr.get_response().outputs]
        names_j = [o["name"] for o in ref["outputs"]]
        if not names_h == names_g == names_j:
            problems.append(f"{role} {model} output names {names_j} {names_h} {names_g}")
        if hr.get_response().get("id") != "x" or gr.get_response().id != "x":
            problems.append(f"{role} {model} id not echoed")

# metadata and health through the clients
print("live", hclient.is_server_live(), client.is_server_live())
print("ready", hclient.is_server_ready(), client.is_server_ready())
for name, call in (
    ("http", lambda: hclient.get_model_metadata("breast-cancer", headers=hauth)),
    ("grpc", lambda: client.get_model_metadata("breast-cancer", headers=auth, as_json=True)),
):
    print(name, "metadata", json.dumps(call())[:300])
for name, call in (
    ("http", lambda: hclient.get_server_metadata(headers=hauth)),
    ("grpc", lambda: client.get_server_metadata(headers=auth, as_json=True)),
):
    print(name, "server metadata", json.dumps(call())[:300])
for name, call in (
    ("http", lambda: hclient.is_model_ready("breast-cancer", headers=hauth)),
    ("grpc", lambda: client.is_model_ready("breast-cancer", headers=auth)),
):
    print(name, "model ready", call())
print("PROBLEMS:" if problems else "no problems", *problems, sep="\n  ")
