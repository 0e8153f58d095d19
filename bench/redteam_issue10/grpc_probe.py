"""The gRPC twin of each hostile case (raw stub), beside the JSON path's answer: status, stable code,
and whether an audit record id came back. Nothing may be INTERNAL/UNKNOWN or a 5xx.

    .venv/bin/python bench/redteam_issue10/grpc_probe.py
"""

from __future__ import annotations

import time

import grpc
import httpx
import numpy as np
from common import demo
from sklearn.datasets import load_breast_cancer

from bastion.grpc import grpc_predict_v2_pb2 as pb
from bastion.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

d = demo()
ROWS = load_breast_cancer().data[:2].astype("<f4")
channel = grpc.insecure_channel(d.grpc)
stub = GRPCInferenceServiceStub(channel)


def message(rows=ROWS, raw=True, model="breast-cancer", datatype="FP32", shape=None) -> pb.ModelInferRequest:
    m = pb.ModelInferRequest(model_name=model, id="p")
    t = m.inputs.add(name="features", datatype=datatype, shape=list(rows.shape) if shape is None else shape)
    if raw:
        m.raw_input_contents.append(rows.tobytes())
    else:
        t.contents.fp32_contents.extend(rows.ravel().tolist())
    return m


def call(name: str, m: pb.ModelInferRequest, metadata=None, method: str = "ModelInfer") -> None:
    if metadata is None:
        metadata = (("authorization", f"Bearer {d.analyst}"),)
    try:
        _, c = getattr(stub, method).with_call(m, metadata=metadata, timeout=30)
        md = dict(c.trailing_metadata() or ())
        print(f"{name:50} OK                 rid={md.get('x-request-id')}")
    except grpc.RpcError as e:
        md = dict(e.trailing_metadata() or ())
        bad = "  <-- !" if e.code().name in ("INTERNAL", "UNKNOWN") else ""
        print(
            f"{name:50} {e.code().name:18} {md.get('bastion-error-code')} rid={md.get('x-request-id')} "
            f"{(e.details() or '')[:70]!r}{bad}"
        )


token = httpx.post(
    d.url("/v2/auth/token"), headers=d.auth(), json={"scope": ["infer:breast-cancer"], "ttl_seconds": 60}
).json()
print("token:", {k: v for k, v in token.items() if k != "access_token"})
tok = token["access_token"]
call("token", message(), (("authorization", f"Bearer {tok}"),))
forged = tok[:-5] + ("A" if tok[-5] != "A" else "B") + tok[-4:]
call("forged token", message(), (("authorization", f"Bearer {forged}"),))
call("token for another model", message(model="diabetes"), (("authorization", f"Bearer {tok}"),))
call("lowercase scheme", message(), (("authorization", f"bearer {d.analyst}"),))
call(
    "two authorization: junk then key",
    message(),
    (("authorization", "Bearer junk"), ("authorization", f"Bearer {d.analyst}")),
)
call(
    "two authorization: key then junk",
    message(),
    (("authorization", f"Bearer {d.analyst}"), ("authorization", "Bearer junk")),
)
call("authorization-bin", message(), (("authorization-bin", f"Bearer {d.analyst}".encode()),))
try:
    call("Authorization (uppercase key)", message(), (("Authorization", f"Bearer {d.analyst}"),))
except Exception as e:
    print("uppercase key refused by the client library:", type(e).__name__, e)
call("16 KiB of metadata", message(), (("authorization", f"Bearer {d.analyst}"), ("x-pad", "a" * 17000)))
nan = ROWS.copy()
nan[0, 3] = np.nan
call("NaN typed", message(nan, raw=False))
call("NaN raw", message(nan))
call("shape []", message(shape=[]))
call("shape 9 dims", message(shape=[1] * 9))
call("shape negative", message(shape=[-2, 30]))
call("shape 2**62 x 2**62", message(shape=[2**62, 2**62]))
call("shape 2**63-1", message(shape=[2**63 - 1, 30]))
call("datatype 'fp32'", message(datatype="fp32"))
call("datatype 'FP16' raw", message(ROWS.astype("<f2"), datatype="FP16"))
call("datatype 'FP16' typed (no field)", message(ROWS.astype("<f2"), raw=False, datatype="FP16"))
call("datatype 'BYTES' raw", message(datatype="BYTES"))
m = message()
m.raw_input_contents.append(b"x")
call("two raw for one input", m)
m = message(raw=False)
m.raw_input_contents.append(ROWS.tobytes())
call("contents and raw both", m)
m = message()
m.inputs.add(name="features", datatype="FP32", shape=[2, 30])
m.raw_input_contents.append(ROWS.tobytes())
call("input twice", m)
m = message()
m.outputs.add(name="secret")
call("output not in manifest", m)
m = message()
m.outputs.add(name="probabilities")
call("ungranted output", m)
m = message()
m.parameters["binary_data_output"].bool_param = True
call("binary_data_output param over gRPC", m)
m = message()
m.parameters["binary_data_output"].string_param = "yes"
call("binary_data_output 'yes' over gRPC", m)
m = message()
m.outputs.add(name="label").parameters["classification"].int64_param = 2
call("classification param", m)
m = message()
m.id = "x" * 300
call("id of 300 chars", m)
call(
    "model_version '1'",
    pb.ModelInferRequest(
        model_name="breast-cancer",
        model_version="1",
        id="v",
        inputs=message().inputs,
        raw_input_contents=message().raw_input_contents,
    ),
)
call(
    "model_version '2'",
    pb.ModelInferRequest(
        model_name="breast-cancer",
        model_version="2",
        inputs=message().inputs,
        raw_input_contents=message().raw_input_contents,
    ),
)
call("model name with NUL", message(model="breast-cancer\0"))
call("ModelReady unknown", pb.ModelReadyRequest(name="nope"), method="ModelReady")
call(
    "ModelMetadata no key", pb.ModelMetadataRequest(name="breast-cancer"), metadata=(), method="ModelMetadata"
)
call("ServerMetadata key", pb.ServerMetadataRequest(), method="ServerMetadata")
for name in (
    "ModelStreamInfer",
    "RepositoryIndex",
    "RepositoryModelLoad",
    "ModelStatistics",
    "ModelConfig",
    "TraceSetting",
    "LogSettings",
    "CudaSharedMemoryStatus",
):
    try:
        channel.unary_unary(f"/inference.GRPCInferenceService/{name}")(b"", timeout=5)
        print(f"{name:50} OK??")
    except grpc.RpcError as e:
        print(f"{name:50} {e.code().name}")
# expired token: the shortest TTL
short = httpx.post(
    d.url("/v2/auth/token"), headers=d.auth(), json={"scope": ["infer:breast-cancer"], "ttl_seconds": 1}
).json()
if "access_token" in short:
    time.sleep(2.5)
    call("expired token", message(), (("authorization", f"Bearer {short['access_token']}"),))
else:
    print("ttl 1 refused:", short)
