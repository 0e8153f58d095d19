"""A gRPC client cancels its ModelInfer calls mid-flight (or lets a short deadline expire): does every
call that spent privacy budget (ran the model, got its DP answer) leave an audit record?

    .venv/bin/python bench/redteam_issue10/grpc_cancel_audit.py [calls]

grpc.aio cancels the handler's task when the client cancels or its deadline passes; asyncio's
CancelledError is not an Exception, so `Bastion._handle` neither catches it nor reaches its audit
write. Expected: one audit record per decision, whatever the client does. Before the fix: budget
spent with no record (and the metrics miss the request too).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time

import grpc
import httpx
from common import ROOT, demo
from sklearn.datasets import load_diabetes

from bastion.grpc import grpc_predict_v2_pb2 as pb
from bastion.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

N = int(sys.argv[1]) if len(sys.argv) > 1 else 40
d = demo()
X = load_diabetes().data.astype("<f4")
rng = random.Random(7)


def budget() -> float:
    r = httpx.get(d.url("/v2/models/diabetes"), headers=d.auth())
    return float(r.json()["parameters"]["privacy_budget_remaining"])


def records(since: float) -> list[dict]:
    out = d.dir / "audit-export.jsonl"
    subprocess.run(
        [
            str(ROOT / ".venv/bin/bastion"),
            "audit",
            "export",
            "--config",
            str(d.dir / "bastion.toml"),
            "-o",
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return [
        r
        for r in rows
        if r.get("ts", 0) >= since and r.get("model") == "diabetes" and r.get("route") == "infer"
    ]


start = time.time()
before = budget()
stub = GRPCInferenceServiceStub(grpc.insecure_channel(d.grpc))
completed = cancelled = 0
for i in range(N):
    m = pb.ModelInferRequest(model_name="diabetes")
    m.inputs.add(name="features", datatype="FP32", shape=[1, 10])
    m.raw_input_contents.append(X[(i * 7 + int(start)) % len(X)][None].tobytes())
    f = stub.ModelInfer.future(m, metadata=(("authorization", f"Bearer {d.analyst}"),))
    time.sleep(rng.uniform(0.0005, 0.006))
    if f.cancel():
        cancelled += 1
    else:
        completed += 1 if f.exception() is None else 0
time.sleep(2)
after = budget()
recs = records(start - 1)
allowed = [r for r in recs if r["status"] == 200]
spent = before - after
print(f"calls {N}: completed {completed}, cancelled by the client {cancelled}")
print(f"privacy budget spent: {spent:g} (epsilon 1 a row: {spent:g} answers drawn)")
print(
    f"audit records for these calls: {len(recs)} ({len(allowed)} with status 200), epsilon in records: "
    f"{sum(r.get('epsilon_spent') or 0 for r in recs):g}"
)
if spent > sum(r.get("epsilon_spent") or 0 for r in recs) + 1e-9:
    print("FINDING: budget spent by requests that have no audit record")
