"""The cost of tracing on the request path: bench/inprocess.py's method with three sides.

Three services in one process on the demo (same policy otherwise): no `[tracing]` section ("absent"),
`[tracing] enabled = false` ("off"), and tracing on with every request sampled ("on": the SDK's
batch processor into an exporter that discards, so the OTLP exporter's own serialisation and
network send, on the processor's thread, are not in the figure). Batches alternate between the
sides (16 concurrent tasks each); CPU time per request counts every thread of the process.

    nice -n 10 .venv/bin/python bench/tracing.py

Every request carries a new first feature, as in bench/inprocess.py; query auditing runs in `alert`
mode on every side (near-duplicate rows would otherwise end the run in a quarantine).
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
from typing import Any

from inprocess import WATCHED
from load import BENCH_ROLE, create_key

from bastion.config import Action, load_config
from bastion.context import RequestContext
from bastion.demo import build_demo, infer_request
from bastion.service import Bastion, Route

ON = '[tracing]\nenabled = true\notlp_endpoint = "http://127.0.0.1:9/v1/traces"\n'


def _discard() -> Any:
    """A span exporter that drops what it is given."""
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class Discard(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    return Discard()


async def run(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="bastion-tracing-"))
    build = build_demo(root / "demo")
    base = (build.config_path.read_text() + BENCH_ROLE).replace(
        WATCHED, WATCHED + 'extraction_watch = "alert"\n'
    )
    sides = [("absent", base), ("off", "[tracing]\nenabled = false\n" + base), ("on", ON + base)]
    template = infer_request(build.features[:1])
    template["inputs"][0]["data"][0] = "__X__"
    text = json.dumps(template)
    services = []
    for i, (name, body_text) in enumerate(sides):
        path = build.config_path.with_name(f"side{i}.toml")
        path.write_text(body_text.replace('state_dir = "state"', f'state_dir = "state-{i}"'))
        key = create_key(path)
        service = Bastion(load_config(path), config_path=path, span_exporter=_discard())
        assert (service.tracing is not None) == (name == "on")
        await service.startup()
        services.append((name, service, key))
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
    for batch in range(args.warmup + args.batches):
        order = services if batch % 2 == 0 else services[::-1]  # no side always runs first
        for name, service, key in order:
            payloads = [body() for _ in range(args.batch_size)]

            async def worker(part: list[bytes], service: Bastion = service, key: str = key) -> None:
                for payload in part:
                    await one(service, key, payload)

            began = time.process_time()
            await asyncio.gather(*(worker(payloads[i::16]) for i in range(16)))
            if batch >= args.warmup:
                cpu[name] += time.process_time() - began
                count[name] += args.batch_size
    for _, service, _ in services:
        await service.aclose()
    per = {name: cpu[name] / count[name] * 1e6 for name in cpu}
    for name in ("off", "on"):
        print(
            f"absent: {per['absent']:.1f} us CPU per request; {name}: {per[name]:.1f} us; "
            f"{name} adds {per[name] - per['absent']:+.1f} us ({per[name] / per['absent'] - 1:+.2%})"
        )
    print(f"({args.batches} batches of {args.batch_size} per side after {args.warmup} warm-up)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=4)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
