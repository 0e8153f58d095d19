"""The cost of the inference deadline and circuit breaker on the request path (issue #13 part 5).

bench/inprocess.py's method, three services in one process on the demo (same policy): "before"
calls the runtime on the event loop with no deadline, as Bastion did before (its Infer stages
swapped for the unguarded `Infer()`, which only the unsafe no-defenses baseline uses); "thread" is
the default (the call on the model's own thread, under its deadline and breaker); "inline" sets
`inference_isolation = "inline"` on the benchmarked ONNX model (on the event loop, the watchdog
stopping it at the deadline, the same breaker). Batches alternate between the sides (16 concurrent
tasks each); CPU time per request counts every thread of the process, the worker threads' hand-offs
included. Then the wall-clock latency of one call alone, with nothing else running:
`GuardedModel.call` of the demo's ONNX runtime vs the same predict called directly.

    nice -n 10 .venv/bin/python bench/breaker.py
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from inprocess import WATCHED, cpu_per_request
from load import BENCH_ROLE, create_key

from bastion.breaker import BreakerPolicy, GuardedModel
from bastion.config import load_config
from bastion.demo import build_demo
from bastion.service import Bastion, Route
from bastion.stages.inference import Infer


async def single_call_latency(
    service: Bastion, features: np.ndarray, rounds: int
) -> tuple[float, float, float]:
    """Median microseconds of one prediction: direct, on the model's thread, inline under the
    watchdog; alternating, one at a time."""
    model = service.registry.get("breast-cancer")
    runtime = model.runtime
    inputs = {model.manifest.inputs[0].name: np.asarray(features[:1], dtype=np.float32)}
    threaded = GuardedModel("bench", BreakerPolicy(), clock=time.monotonic)
    inline = GuardedModel("bench", BreakerPolicy(inline=True), clock=time.monotonic)
    times: list[list[float]] = [[], [], []]
    for _ in range(rounds):
        began = time.perf_counter()
        runtime.predict(inputs)
        times[0].append(time.perf_counter() - began)
        for i, guarded in ((1, threaded), (2, inline)):
            run, cancel = runtime.stoppable(inputs)  # type: ignore[attr-defined]
            began = time.perf_counter()
            await guarded.call(run, cancel)
            times[i].append(time.perf_counter() - began)
    threaded.close()
    direct, thread, watched = (statistics.median(t) * 1e6 for t in times)
    return direct, thread, watched


async def run(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="bastion-breaker-"))
    build = build_demo(root / "demo")
    threads = f"inference_threads = {args.threads}\n" if args.threads else ""
    base = (build.config_path.read_text() + BENCH_ROLE).replace(
        WATCHED, WATCHED + 'extraction_watch = "alert"\n' + threads
    )
    # The benchmarked ONNX model inline (inference_threads would be refused there: it does not apply).
    entry = 'path = "bundles/breast-cancer-1"\n' + WATCHED + 'extraction_watch = "alert"\n'
    assert entry + threads in base
    inline = base.replace(entry + threads, entry + 'inference_isolation = "inline"\n')
    services = []
    for i, (name, text) in enumerate((("before", base), ("thread", base), ("inline", inline))):
        path = build.config_path.with_name(f"side{i}.toml")
        path.write_text(text.replace('state_dir = "state"', f'state_dir = "state-{i}"'))
        key = create_key(path)
        service = Bastion(load_config(path), config_path=path)
        if name == "before":
            for route in (Route.INFER, Route.AGGREGATE):
                stages = service.pipelines[route]
                service.pipelines[route] = [Infer() if isinstance(s, Infer) else s for s in stages]
        await service.startup()
        services.append((name, service, key))
    per = await cpu_per_request(
        services,
        build.features,
        warmup=args.warmup,
        batches=args.batches,
        batch_size=args.batch_size,
        alternate=True,
    )
    alone = await single_call_latency(services[1][1], build.features, args.rounds)
    for _, service, _ in services:
        await service.aclose()
    a = per["before"]
    for name in ("thread", "inline"):
        b = per[name]
        print(
            f"before: {a:.1f} us CPU per request; {name}: {b:.1f} us; {name} adds {b - a:+.1f} us; "
            f"ratio {name}/before (requests per CPU second): {a / b:.3f}"
        )
    print(f"({args.batches} batches of {args.batch_size} per side after {args.warmup} warm-up)")
    print(
        f"one call alone, median of {args.rounds}: direct {alone[0]:.1f} us, thread {alone[1]:.1f} us, "
        f"inline {alone[2]:.1f} us"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5000)
    parser.add_argument("--threads", type=int, help="inference_threads on every model (default: its default)")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
