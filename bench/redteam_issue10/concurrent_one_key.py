"""One key, 300 concurrent ModelInfer calls on one gRPC channel, then 300 concurrent REST requests:
the same rate limit and the same refusals on both transports (nothing else: no 5xx, no UNKNOWN).

    .venv/bin/python bench/redteam_issue10/concurrent_one_key.py
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import grpc
import httpx
from common import demo
from sklearn.datasets import load_breast_cancer

from bastion.grpc import grpc_predict_v2_pb2 as pb
from bastion.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

d = demo()
X = load_breast_cancer().data.astype("<f4")


async def over_grpc(n: int) -> Counter[str]:
    async with grpc.aio.insecure_channel(d.grpc) as channel:
        stub = GRPCInferenceServiceStub(channel)

        async def one(i: int) -> str:
            m = pb.ModelInferRequest(model_name="breast-cancer")
            m.inputs.add(name="features", datatype="FP32", shape=[1, 30])
            m.raw_input_contents.append(X[i % len(X)][None].tobytes())
            try:
                await stub.ModelInfer(m, metadata=(("authorization", f"Bearer {d.analyst}"),), timeout=30)
                return "OK"
            except grpc.aio.AioRpcError as e:
                return f"{e.code().name} {dict(e.trailing_metadata() or ()).get('bastion-error-code')}"

        return Counter(await asyncio.gather(*(one(i) for i in range(n))))


async def over_rest(n: int) -> Counter[str]:
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=n)) as client:

        async def one(i: int) -> str:
            body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 30],
                                "data": X[i % len(X)].tolist()}]}  # fmt: skip
            r = await client.post(
                d.url("/v2/models/breast-cancer/infer"), json=body, headers=d.auth(), timeout=30
            )
            return "OK" if r.status_code == 200 else f"{r.status_code} {r.json().get('code')}"

        return Counter(await asyncio.gather(*(one(i) for i in range(n))))


print("gRPC:", dict(asyncio.run(over_grpc(300))))
time.sleep(3)  # the analyst's bucket refills (20 a second, burst 40)
print("REST:", dict(asyncio.run(over_rest(300))))
