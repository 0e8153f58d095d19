"""The audit sinks side by side in one run: SQLite (fsync on) against PostgreSQL (the local server,
synchronous_commit as configured there), one writer and two writer processes on one chain.

Each writer is an `AuditLog` (its own process) with --concurrency tasks that each submit a record like a request's
(about 500 bytes of JSON) with wait=True and wait for its commit, for --seconds; rounds alternate
the sinks. Prints records/s (all writers together), the commit latency a request waits (p50, p99),
the mean batch size and the writer processes' CPU per record (event loop and commit thread),
then checks that every chain verifies.

    .venv/bin/python bench/audit_sink.py [--seconds 3] [--rounds 2] [--concurrency 1 32]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from bastion.audit import AuditLog, AuditSink, SQLiteSink  # noqa: E402
from bastion.audit.postgres import PostgresSink  # noqa: E402
from bastion.audit.verify import AuditSource, verify_chain  # noqa: E402

DSN = os.environ.get("BASTION_BENCH_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
RECORD = {
    "ts": 0.0,
    "route": "infer",
    "action": "infer",
    "principal": "key_0123456789abcdef",
    "via": "api_key",
    "model": "breast-cancer",
    "version": "1",
    "digest": "sha256:" + "ab" * 32,
    "decision": "allow",
    "reason": "ok",
    "status": 200,
    "latency_ms": 1.234,
    "payload_hmac": "cd" * 32,
    "output_policy": "label",
    "epsilon_spent": None,
    "rho_spent": None,
    "client": "127.0.0.1",
}


def _sink(kind: str, where: str, pem: bytes) -> AuditSink:
    key = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(key, Ed25519PrivateKey)
    if kind == "sqlite":
        return SQLiteSink(Path(where), key)
    return PostgresSink(DSN, key, table=where)


def _writer(
    kind: str, where: str, pem: bytes, seconds: float, concurrency: int, start: Any, out: Any
) -> None:
    async def run() -> tuple[int, list[float], int, float]:
        sink = _sink(kind, where, pem)
        log = AuditLog(sink)
        latencies: list[float] = []
        commits = 0
        original = sink.commit

        def counted() -> None:  # every transaction ends here (`append` calls it too)
            nonlocal commits
            commits += 1
            original()

        sink.commit = counted  # type: ignore[method-assign]
        start.wait()
        deadline = time.perf_counter() + seconds
        cpu = time.process_time()

        async def client() -> None:
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                pending = log.submit(
                    {**RECORD, "ts": time.time(), "request_id": secrets.token_hex(8)}, wait=True
                )
                assert pending is not None
                await pending
                latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(client() for _ in range(concurrency)))
        cpu = time.process_time() - cpu
        log.close()
        return len(latencies), latencies, commits, cpu

    out.put(asyncio.run(run()))


def _round(
    kind: str, where: str, pem: bytes, writers: int, concurrency: int, args: argparse.Namespace
) -> dict[str, float]:
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Barrier(writers), ctx.Queue()
    procs = [
        ctx.Process(target=_writer, args=(kind, where, pem, args.seconds, concurrency, start, out))
        for _ in range(writers)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=args.seconds + 120) for _ in procs]
    for p in procs:
        p.join()
    count = sum(r[0] for r in results)
    latencies = sorted(x for r in results for x in r[1])
    commits = sum(r[2] for r in results)
    cpu = sum(r[3] for r in results)
    return {
        "rps": count / args.seconds,
        "p50": latencies[len(latencies) // 2] * 1000,
        "p99": latencies[int(len(latencies) * 0.99)] * 1000,
        "batch": count / max(1, commits),
        "cpu_us": cpu / max(1, count) * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 32], help="requests waiting at once, per writer"
    )
    args = parser.parse_args()
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    work = Path(tempfile.mkdtemp(prefix="bastion-audit-bench-", dir=os.environ.get("BENCH_DIR")))
    table = f"bastion_bench_{secrets.token_hex(4)}"
    with psycopg.connect(DSN) as conn:
        commit_setting = conn.execute("SHOW synchronous_commit").fetchone()
    print(
        f"PostgreSQL at {DSN.rsplit('@', 1)[-1]}, synchronous_commit = {commit_setting[0] if commit_setting else '?'}"
    )
    results: dict[tuple[int, int, str], list[dict[str, float]]] = {}
    try:
        for r in range(args.rounds):
            for concurrency in args.concurrency:
                for writers in (1, 2):
                    for kind in ("sqlite", "postgres"):
                        where = (
                            str(work / f"audit-{writers}.db") if kind == "sqlite" else f"{table}_{writers}"
                        )
                        run = _round(kind, where, pem, writers, concurrency, args)
                        results.setdefault((concurrency, writers, kind), []).append(run)
                        print(f"round {r + 1}: c={concurrency} {kind} x{writers}: {run}", flush=True)
        print(f"\n{args.seconds:g} s x {args.rounds} rounds, medians")
        print(
            "| waiting per writer | writers | sink | records/s | commit wait p50 / p99 (ms) "
            "| records per commit | CPU per record (µs) |"
        )
        print("|---|---|---|---|---|---|---|")
        for (concurrency, writers, kind), runs in results.items():
            med = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
            print(
                f"| {concurrency} | {writers} | {kind} | {med['rps']:,.0f} | "
                f"{med['p50']:.2f} / {med['p99']:.2f} | {med['batch']:.1f} | {med['cpu_us']:.0f} |"
            )
        for writers in (1, 2):
            sqlite = verify_chain(*AuditSource.sqlite(work / f"audit-{writers}.db").read(), key.public_key())
            pg = verify_chain(*AuditSource.postgres(DSN, f"{table}_{writers}").read(), key.public_key())
            print(f"verified x{writers}: sqlite {sqlite.records} records, postgres {pg.records} records")
    finally:
        with psycopg.connect(DSN) as conn:
            for writers in (1, 2):
                for suffix in ("", "_checkpoints", "_signer"):
                    conn.execute(f"DROP TABLE IF EXISTS {table}_{writers}{suffix}")


if __name__ == "__main__":
    main()
