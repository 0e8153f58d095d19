"""What reading a call's message in the handler costs (the F1 fix), on a bare grpc.aio server.

    .venv/bin/python bench/redteam_issue10/grpc_read_cost.py

Server pinned to CPU 0, client to CPU 1 (16 concurrent, 20,000 calls a variant, 3 rounds), server CPU
per call read through a control RPC. Variants: U, grpc's unary handler (the old registration); N,
client-streaming with `context.read()` and no bound; S, the same under `asyncio.timeout` (a timer a
call); B, the same with one timer per quarter second for every call whose wait ends in it (the fix).
"""

from __future__ import annotations

import asyncio
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tests.helpers import free_port  # noqa: E402

TIMEOUT = 30.0


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def serve(port: int) -> None:
    groups: dict[float, set[asyncio.Task[Any]]] = {}

    def expire(group: float) -> None:
        for task in groups.pop(group, ()):
            task.cancel()

    async def unary(body: bytes, ctx: Any) -> bytes:
        return body

    async def unbounded(_: Any, ctx: Any) -> bytes:
        return await ctx.read()

    async def timer_a_call(_: Any, ctx: Any) -> bytes:
        async with asyncio.timeout(TIMEOUT):
            return await ctx.read()

    async def grouped(_: Any, ctx: Any) -> bytes:
        loop, task = asyncio.get_running_loop(), asyncio.current_task()
        assert task is not None
        group = math.ceil((loop.time() + TIMEOUT) * 4) / 4
        tasks = groups.get(group)
        if tasks is None:
            tasks = groups[group] = set()
            loop.call_at(group, expire, group)
        tasks.add(task)
        try:
            return await ctx.read()
        finally:
            groups.get(group, set()).discard(task)

    async def cpu_rpc(body: bytes, ctx: Any) -> bytes:
        return str(cpu()).encode()

    def same(b: bytes) -> bytes:
        return b

    handlers = grpc.method_handlers_generic_handler(
        "b.B",
        {
            "U": grpc.unary_unary_rpc_method_handler(unary, response_serializer=same),
            "N": grpc.stream_unary_rpc_method_handler(unbounded, response_serializer=same),
            "S": grpc.stream_unary_rpc_method_handler(timer_a_call, response_serializer=same),
            "B": grpc.stream_unary_rpc_method_handler(grouped, response_serializer=same),
            "C": grpc.unary_unary_rpc_method_handler(cpu_rpc, response_serializer=same),
        },
    )
    server = grpc.aio.server(maximum_concurrent_rpcs=1024)
    server.add_generic_rpc_handlers((handlers,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


async def client(port: int, n: int = 20000, concurrency: int = 16) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        control = channel.unary_unary("/b.B/C")
        results: dict[str, list[float]] = {}
        for round_ in range(3):
            for variant in ("U", "N", "S", "B"):
                call = channel.unary_unary(f"/b.B/{variant}")

                async def worker(k: int, call: Any = call) -> None:
                    for _ in range(k):
                        await call(b"x" * 100)

                before = float(await control(b""))
                await asyncio.gather(*(worker(n // concurrency) for _ in range(concurrency)))
                per_call = (float(await control(b"")) - before) / n * 1e6
                results.setdefault(variant, []).append(per_call)
                print(f"round {round_} {variant}: server CPU {per_call:.1f} µs a call", flush=True)
        for variant, values in results.items():
            print(f"{variant}: median {statistics.median(values):.1f} µs a call")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "serve":
        asyncio.run(serve(int(sys.argv[2])))
    else:
        port = free_port()
        cmd = ["taskset", "-c", "0", sys.executable, __file__, "serve", str(port)]
        server = subprocess.Popen(cmd)
        time.sleep(2)
        try:
            subprocess.run(
                ["taskset", "-p", "-c", "1", str(os.getpid())],
                check=False,
                capture_output=True,
            )
            asyncio.run(client(port))
        finally:
            server.kill()
