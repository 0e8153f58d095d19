"""A gzip-compressed ModelInfer whose message inflates far past [grpc] max_receive_message_bytes
(a compression bomb), and the failed-authentication throttle over gRPC.

    .venv/bin/python bench/redteam_issue10/grpc_compression.py
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import grpc
from common import demo

from bastion.grpc import grpc_predict_v2_pb2 as pb
from bastion.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

d = demo()


def server_rss() -> str:
    port = d.grpc.rsplit(":", 1)[1]
    out = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True).stdout
    pid = out.split("pid=")[1].split(",")[0] if "pid=" in out else None
    if pid is None:
        return "?"
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return line.split(":")[1].strip()
    return "?"


print("server RSS before:", server_rss())
with grpc.insecure_channel(d.grpc, options=[("grpc.max_send_message_length", 1 << 30)]) as ch:
    stub = GRPCInferenceServiceStub(ch)
    for size in (2 << 20, 64 << 20, 512 << 20):
        m = pb.ModelInferRequest(model_name="breast-cancer", id="a" * size)
        try:
            stub.ModelInfer(
                m,
                metadata=(("authorization", f"Bearer {d.analyst}"),),
                timeout=60,
                compression=grpc.Compression.Gzip,
            )
            print(size, "OK?!")
        except grpc.RpcError as e:
            md = dict(e.trailing_metadata() or ())
            print(
                f"{size >> 20} MiB inflated:",
                e.code().name,
                md.get("bastion-error-code"),
                (e.details() or "")[:90],
            )
        print("  server RSS:", server_rss())
    # failed authentication, 25 times from one address, then a valid key
    codes = []
    for _ in range(25):
        try:
            stub.ServerMetadata(
                pb.ServerMetadataRequest(),
                metadata=(("authorization", "Bearer bst_0000000000000000_" + "A" * 43),),
            )
        except grpc.RpcError as e:
            codes.append(dict(e.trailing_metadata() or ()).get("bastion-error-code"))
    print("25 bad keys:", {c: codes.count(c) for c in set(codes)})
    try:
        stub.ServerMetadata(pb.ServerMetadataRequest(), metadata=(("authorization", f"Bearer {d.analyst}"),))
        print("then a valid key: OK")
    except grpc.RpcError as e:
        print(
            "then a valid key:",
            e.code().name,
            dict(e.trailing_metadata() or ()).get("bastion-error-code"),
            dict(e.trailing_metadata() or ()).get("retry-after"),
        )
