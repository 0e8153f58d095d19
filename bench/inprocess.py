"""A side-by-side cost comparison without HTTP: two configured services in one process, fed the
same kind of requests in alternating batches (16 concurrent tasks each), CPU time per request
(all threads: the audit writer and the noise sampler count) for each.

On this machine the wrk benchmark (bench/load.py) swings by 10-20% between rounds, more than the
differences it is asked to resolve; this harness, with no sockets and both sides in one process,
repeats to a few microseconds. It measures the pipeline (every stage, the audit record), not the
HTTP server around it.

    .venv/bin/python bench/inprocess.py --policy dp_scores
    .venv/bin/python bench/inprocess.py --watch
    .venv/bin/python bench/inprocess.py --drift

Every request carries a new first feature (as infer_jitter.lua does), so neither the answer cache
nor the extraction monitor's repeat check sees a repeat. Query auditing runs in `alert` mode on
both sides (the jittered rows are near-duplicates: a quarantine would end the run), except on the
"off" side of --watch.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
from load import BENCH_ROLE, create_key

from bastion.config import Action, load_config
from bastion.context import RequestContext
from bastion.demo import build_demo, infer_request
from bastion.service import Bastion, Route

WATCHED = 'trusted_keys = ["keys/release.pub"]\n'


def configs(args: argparse.Namespace, root: Path) -> tuple[list[tuple[str, Path]], np.ndarray]:
    build = build_demo(root / "demo")
    text = build.config_path.read_text() + BENCH_ROLE
    base = text.replace(WATCHED, WATCHED + 'extraction_watch = "alert"\n')
    if args.drift:
        # Drift on the benchmarked model: off vs on. The on side's background task is held off (an
        # hour's interval): process CPU counts every thread, and this measures the request path; the
        # statistics' own cost is timed apart, after the run.
        first = WATCHED + 'extraction_watch = "alert"\n'
        sides = [
            ("drift off", base.replace(first, first + "[models.drift]\nenabled = false\n", 1)),
            ("drift on", base.replace(first, first + "[models.drift]\ninterval_seconds = 3600\n", 1)),
        ]
    elif args.watch:
        sides = [
            ("watch off", text.replace(WATCHED, WATCHED + 'extraction_watch = "off"\n')),
            ("watch on", base),
        ]
    else:
        # A budget only where the policy spends one: on any other grant it is refused at start-up.
        budget = ", privacy_budget = 1e12" if args.policy == "dp_scores" else ""
        grant = f'output = "{args.policy}"{budget} }} ]'
        sides = [("probabilities", base), (args.policy, base.replace('output = "probabilities" } ]', grant))]
    out = []
    for i, (name, body) in enumerate(sides):
        path = build.config_path.with_name(f"side{i}.toml")
        path.write_text(body.replace('state_dir = "state"', f'state_dir = "state-{i}"'))
        out.append((name, path))
    return out, build.features


async def run(args: argparse.Namespace) -> None:
    sides, features = configs(args, Path(tempfile.mkdtemp(prefix="bastion-inprocess-")))
    services = []
    for name, config in sides:
        key = create_key(config)
        service = Bastion(load_config(config), config_path=config)
        await service.startup()
        services.append((name, service, key))
    per = await cpu_per_request(
        services, features, warmup=args.warmup, batches=args.batches, batch_size=args.batch_size
    )
    if args.drift:
        await drift_statistics_cost(services[1][1])
    for _, service, _ in services:
        await service.aclose()
    (a, b) = [per[n] for n, _, _ in services]
    (name_a, name_b) = [n for n, _, _ in services]
    print(f"{name_a}: {a:.1f} us CPU per request; {name_b}: {b:.1f} us; {name_b} adds {b - a:+.1f} us")
    print(f"ratio {name_b}/{name_a} (requests per CPU second): {a / b:.3f}")
    print(f"({args.batches} batches of {args.batch_size} per side after {args.warmup} warm-up)")


async def cpu_per_request(
    services: list[tuple[str, Bastion, str]],
    features: np.ndarray,
    *,
    warmup: int,
    batches: int,
    batch_size: int,
    alternate: bool = False,
) -> dict[str, float]:
    """CPU microseconds per request for each (name, service, key): batches of `batch_size` one-row V2
    JSON requests (each row new, so no answer cache), 16 in flight, the sides interleaved batch by
    batch (`alternate`: their order reversed every other batch, so no side always runs first). The
    heap is frozen first, as the server does at start-up. Exits if a request is not answered 200."""
    template = infer_request(features[:1])
    template["inputs"][0]["data"][0] = "__X__"
    text = json.dumps(template)
    gc.collect()
    gc.freeze()
    seen: set[str] = set()

    def body() -> bytes:
        while True:
            value = f"{17.5 + random.random():.6f}"
            if value not in seen:
                seen.add(value)
                return text.replace('"__X__"', value).encode()

    async def one(service: Bastion, key: str, payload: bytes) -> None:
        async def read_body(limit: int) -> bytes:
            return payload

        ctx = RequestContext(
            request_id=os.urandom(8).hex(),
            action=Action.INFER,
            now=time.time(),
            credentials=f"Bearer {key}",
            read_body=read_body,
            model_name="breast-cancer",
        )
        outcome = await service.handle(Route.INFER, ctx)
        if outcome.status != 200:
            raise SystemExit(f"status {outcome.status}: {outcome.body!r}: the comparison is void")

    cpu = {name: 0.0 for name, _, _ in services}
    count = dict.fromkeys(cpu, 0)
    for batch in range(warmup + batches):
        order = services[::-1] if alternate and batch % 2 else services
        for name, service, key in order:
            payloads = [body() for _ in range(batch_size)]

            async def worker(part: list[bytes], service: Bastion = service, key: str = key) -> None:
                for payload in part:
                    await one(service, key, payload)

            began = time.process_time()
            await asyncio.gather(*(worker(payloads[i::16]) for i in range(16)))
            if batch >= warmup:
                cpu[name] += time.process_time() - began
                count[name] += batch_size
    return {name: cpu[name] / count[name] * 1e6 for name in cpu}


async def drift_statistics_cost(service: Bastion) -> None:
    """The background task's work for one full window of the benchmarked model (off the request path)."""
    monitor = next(m for m in service.drift.monitors.values() if m.model.name == "breast-cancer")
    rounds, rows, began = 20, 0, time.process_time()
    for _ in range(rounds):
        monitor._judged = 0  # the same full window again
        window = monitor.snapshot()
        monitor.compute(window)
        rows = 0 if window.rows is None else len(window.rows)
    cost = (time.process_time() - began) / rounds
    columns = len(monitor.features)
    print(f"drift statistics: {cost * 1e3:.2f} ms CPU per evaluation ({rows} rows x {columns} features)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--policy", choices=["label", "top_k", "rounded", "reverse_sigmoid", "dp_scores"])
    parser.add_argument("--watch", action="store_true", help="query auditing off vs on, policy probabilities")
    parser.add_argument(
        "--drift", action="store_true", help="drift detection off vs on, policy probabilities"
    )
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=4)
    args = parser.parse_args()
    if args.policy is None and not args.watch and not args.drift:
        parser.error("give --policy P, --watch or --drift")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
