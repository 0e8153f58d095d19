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
import tempfile
from pathlib import Path
from typing import Any

from inprocess import WATCHED, cpu_per_request
from load import BENCH_ROLE, create_key

from bastion.config import load_config
from bastion.demo import build_demo
from bastion.service import Bastion

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
    services = []
    for i, (name, body_text) in enumerate(sides):
        path = build.config_path.with_name(f"side{i}.toml")
        path.write_text(body_text.replace('state_dir = "state"', f'state_dir = "state-{i}"'))
        key = create_key(path)
        service = Bastion(load_config(path), config_path=path, span_exporter=_discard())
        assert (service.tracing is not None) == (name == "on")
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
    for _, service, _ in services:
        await service.aclose()
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
