"""Scaling benchmark: `bastion serve --workers N` with every defense on, for several N, side by side.

One demo build, one policy (query auditing on, alerting only, so the benchmark's own keys are not
quarantined), the audit log in sync durability with fsync (the default). Each round starts the
server once per worker count in turn (1, 2, 4, 1, 2, 4, ...: drift on the machine hits every count
alike), waits until every worker listens, warms up, and drives it with wrk for `--seconds`: every
request a new row, the requests taking turns among `--principals` API keys (bench/infer_keys.lua),
new rows so that query auditing and its shared histories do their work. The server may use every
CPU; wrk runs on CPU 1 (on a 2-core machine it shares that core with a worker: say so with
the figures). Prints requests/s, p50, p99 and server CPU per request (all processes), median of
the rounds.

    .venv/bin/python bench/workers.py [--workers 1,2,4] [--seconds 10] [--rounds 3] \
        [--connections 16] [--principals 8] [--state sqlite|redis|postgres]

Reusable: `Target` + `measure` drive any URL (a load balancer in front of replicas, another
server) with the same load and the same figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.load import POSTGRES_DSN, REDIS_URL, bench_policy, create_key, free_port, parse_wrk  # noqa: E402

from bastion.demo import build_demo, infer_request  # noqa: E402


@dataclass
class Target:
    """Something to load: a URL, the keys to take turns with, the PIDs whose CPU time counts."""

    name: str
    url: str
    keys: list[str]
    pids: list[int]


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def run_wrk(target: Target, body: Path, seconds: int, connections: int) -> dict[str, float]:
    env = {**os.environ, "BASTION_BENCH_BODY": str(body), "BASTION_BENCH_KEYS": ",".join(target.keys)}
    out = subprocess.run(
        [
            *("taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"),
            *("-s", str(ROOT / "bench" / "infer_keys.lua"), target.url),
        ],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    result = parse_wrk(out)
    if result["errors"]:
        statuses = ", ".join(f"{code}: {n}" for code, n in re.findall(r"^status (\d+) (\d+)$", out, re.M))
        first = re.search(r"^first error: (.*)$", out, re.M)
        print(f"{target.name}: answers by status: {statuses}; {first.group(1) if first else ''}", flush=True)
    return result


def measure(target: Target, body: Path, seconds: int, connections: int) -> dict[str, float]:
    """Warm up 2 s, then `seconds` of load: req/s, p50 and p99 (ms), non-2xx count, CPU us/request."""
    run_wrk(target, body, 2, connections)
    before = cpu_seconds(target.pids)
    r = run_wrk(target, body, seconds, connections)
    r["cpu_us"] = (cpu_seconds(target.pids) - before) / (r["rps"] * seconds) * 1e6
    return r


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def start(config: Path, workers: int) -> tuple[subprocess.Popen[bytes], int, list[int]]:
    """`bastion serve --workers N`: the supervisor, its port, and every process once all are ready."""
    port = free_port()
    cmd = [sys.executable, "-m", "bastion.cli", "serve", "--config", str(config), "--port", str(port)]
    log = (config.parent / f"server-{port}.log").open("wb")  # read when a run is void
    proc = subprocess.Popen(
        [*cmd, "--log-level", "warning", "--workers", str(workers)], stdout=log, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                pids = [proc.pid] + (children(proc.pid) if workers > 1 else [])
                if workers == 1 or (len(pids) == workers + 1 and _all_listening(pids[1:], port)):
                    return proc, port, pids
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start")


def _all_listening(pids: list[int], port: int) -> bool:
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if int(f[1].split(":")[1], 16) == port and f[3] == "0A":
                listening.add(f[9])
    for pid in pids:
        fds = Path(f"/proc/{pid}/fd")
        inodes = {os.readlink(fd)[8:-1] for fd in fds.iterdir() if os.readlink(fd).startswith("socket:")}
        if not inodes & listening:
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", default="1,2,4", help="worker counts, comma-separated")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--principals", type=int, default=8, help="API keys the requests take turns with")
    parser.add_argument("--state", choices=["sqlite", "redis", "postgres"], default="sqlite")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: `apt-get install wrk` (make bench does it)")
    counts = [int(n) for n in args.workers.split(",")]

    work = Path(tempfile.mkdtemp(prefix="bastion-bench-workers-"))
    build = build_demo(work / "demo")
    text = bench_policy(build.config_path)
    tag = f"bastion_bench_workers_{os.getpid()}"
    if args.state == "redis":
        text = text.replace(
            'backend = "sqlite"', f'backend = "redis"\nredis_url = "{REDIS_URL}"\nredis_prefix = "{tag}:"'
        )
    elif args.state == "postgres":
        text = text.replace(
            'backend = "sqlite"',
            f'backend = "postgres"\npostgres_dsn = "{POSTGRES_DSN}"\npostgres_table = "{tag}"',
        )
    build.config_path.write_text(text)
    keys = [create_key(build.config_path) for _ in range(args.principals)]
    request = infer_request(build.features[:1])
    request["inputs"][0]["data"][0] = "__X__"
    body = work / "request.json"
    body.write_text(json.dumps(request).replace('"__X__"', "__X__"))

    results: dict[int, list[dict[str, float]]] = {n: [] for n in counts}
    load_before = os.getloadavg()[0]  # another process busy on this machine skews every figure
    try:
        for rnd in range(args.rounds):
            for n in counts:
                proc, port, pids = start(build.config_path, n)
                try:
                    target = Target(
                        f"{n} workers", f"http://127.0.0.1:{port}/v2/models/breast-cancer/infer", keys, pids
                    )
                    r = measure(target, body, args.seconds, args.connections)
                finally:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(timeout=60)
                if r["errors"]:
                    logged = (build.config_path.parent / f"server-{port}.log").read_text()[-3000:]
                    raise SystemExit(
                        f"{n} workers: {int(r['errors'])} non-2xx responses: the run is void\n{logged}"
                    )
                results[n].append(r)
                print(
                    f"round {rnd + 1} {n} worker(s): {r['rps']:8.0f} req/s  p50 {r['p50']:6.2f} ms  "
                    f"p99 {r['p99']:6.2f} ms  server CPU {r['cpu_us']:5.0f} us/req",
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
        _drop(args.state, tag)

    def med(n: int, field: str) -> float:
        return statistics.median(r[field] for r in results[n])

    print()
    print("| workers | req/s | p50 ms | p99 ms | server CPU us/req | req/s vs 1 |")
    print("|---:|---:|---:|---:|---:|---:|")
    first = med(counts[0], "rps")
    for n in counts:
        print(
            f"| {n} | {med(n, 'rps'):.0f} | {med(n, 'p50'):.2f} | {med(n, 'p99'):.2f} | "
            f"{med(n, 'cpu_us'):.0f} | {med(n, 'rps') / first:.2f}x |"
        )
    print(
        f"\n(median of {args.rounds} rounds of {args.seconds} s, {args.connections} connections, "
        f"{args.principals} principals, every request a new row, state {args.state}, audit sync+fsync; "
        f"{os.cpu_count()} CPUs, wrk on CPU 1; load average {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after)"
    )


def _drop(state: str, tag: str) -> None:
    """The run's rows in Redis or PostgreSQL are scratch."""
    if state == "redis":
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        found = list(client.scan_iter(match=f"{tag}:*"))
        if found:
            client.delete(*found)
    elif state == "postgres":
        import psycopg

        with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
            for suffix in ("", "_history", "_records"):
                conn.execute(f"DROP TABLE IF EXISTS {tag}{suffix}")


if __name__ == "__main__":
    main()
