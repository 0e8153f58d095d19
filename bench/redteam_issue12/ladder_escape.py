"""Climb the ladder on breast-cancer (throttle_rate 2 rows/s, then degrade to label), then try to
escape each step: a token of the same key, gRPC, the binary tensor path, the versioned route.
usage: ladder_escape.py HTTP_URL GRPC_ADDR KEY_ENV ADMIN_ENV BUNDLE_DIR"""

import json
import os
import sys
import time

import httpx
import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

url, gaddr, key, admin, bundle = (
    sys.argv[1],
    sys.argv[2],
    os.environ[sys.argv[3]],
    os.environ[sys.argv[4]],
    sys.argv[5],
)
kid = key.split("_")[1]
X = np.load(os.path.join(bundle, "reference.npz"))["features"].astype(np.float32)
sd = X.std(0)


def req(rows):
    return {
        "inputs": [
            {
                "name": "features",
                "shape": list(rows.shape),
                "datatype": "FP32",
                "data": [round(float(v), 6) for v in rows.ravel()],
            }
        ]
    }


def steps():
    r = httpx.get(url + "/v2/admin/incidents", headers={"Authorization": f"Bearer {admin}"}).json()
    return [i["action"] for i in reversed(r["incidents"]) if i["principal"] == f"key:{kid}"]


def climb(step, seed):
    rng = np.random.default_rng(seed)
    seeds = X[200 + 5 * seed : 205 + 5 * seed]
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}) as c:
        for i in range(300):
            row = seeds[i % 5] + 0.01 * sd * np.sign(rng.standard_normal(30))
            c.post("/v2/models/breast-cancer/infer", json=req(row[None].astype(np.float32)))
            if i % 5 == 4 and step in steps():
                return True
            time.sleep(0.6)
    return False


def grpc_infer(rows, token=key):
    cl = triton.InferenceServerClient(gaddr)
    inp = triton.InferInput("features", list(rows.shape), "FP32")
    inp.set_data_from_numpy(rows)
    try:
        r = cl.infer("breast-cancer", [inp], headers={"authorization": f"Bearer {token}"})
        return 200, [o["name"] for o in r.get_response(as_json=True)["outputs"]]
    except InferenceServerException as e:
        return e.status(), e.message()[:60]


def http_infer(path, rows, token=key, binary=False):
    h = {"Authorization": f"Bearer {token}"}
    if binary:
        hdr = json.dumps(
            {
                "inputs": [
                    {
                        "name": "features",
                        "shape": list(rows.shape),
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": rows.nbytes},
                    }
                ]
            }
        ).encode()
        h["Inference-Header-Content-Length"] = str(len(hdr))
        h["Content-Type"] = "application/octet-stream"
        r = httpx.post(url + path, content=hdr + rows.tobytes(), headers=h)
        if r.status_code == 200:
            n = int(r.headers.get("inference-header-content-length", len(r.content)))
            return 200, [o["name"] for o in json.loads(r.content[:n])["outputs"]]
        return r.status_code, r.json().get("code")
    r = httpx.post(url + path, json=req(rows), headers=h)
    return r.status_code, (
        r.json().get("code") if r.status_code != 200 else [o["name"] for o in r.json()["outputs"]]
    )


print("throttle reached:", climb("throttle", 0), steps())
tok = httpx.post(
    url + "/v2/auth/token",
    headers={"Authorization": f"Bearer {key}"},
    json={"scope": ["infer:breast-cancer"], "ttl_seconds": 300},
).json()["access_token"]
batch = X[:32]
for name, f in [
    ("key http 32 rows", lambda: http_infer("/v2/models/breast-cancer/infer", batch)),
    ("token http 32 rows", lambda: http_infer("/v2/models/breast-cancer/infer", batch, tok)),
    ("versioned 32 rows", lambda: http_infer("/v2/models/breast-cancer/versions/1/infer", batch)),
    ("binary 32 rows", lambda: http_infer("/v2/models/breast-cancer/infer", batch, binary=True)),
    ("grpc 32 rows", lambda: grpc_infer(batch)),
    ("grpc token 32 rows", lambda: grpc_infer(batch, tok)),
]:
    print(" throttled?", name, f())
time.sleep(3)
print("degrade reached:", climb("degrade", 1), steps())
one = X[:1]
for name, f in [
    ("key http", lambda: http_infer("/v2/models/breast-cancer/infer", one)),
    ("token http", lambda: http_infer("/v2/models/breast-cancer/infer", one, tok)),
    ("binary", lambda: http_infer("/v2/models/breast-cancer/infer", one, binary=True)),
    ("grpc", lambda: grpc_infer(one)),
    ("grpc token", lambda: grpc_infer(one, tok)),
    ("versioned", lambda: http_infer("/v2/models/breast-cancer/versions/1/infer", one)),
]:
    time.sleep(1.1)
    print(" degraded?", name, f())
