"""Load benchmark: Bastion with every defense on against the same server with them off.

Both servers serve the demo ONNX model from the same build; they take turns
under the same wrk load (rounds alternate A/B/A/B so drift hits both), each
pinned to CPU 0 with wrk pinned to CPU 1. Prints requests/s, p50 and p99 for
each and the ratio on/off.

    .venv/bin/python bench/load.py [--seconds 10] [--rounds 3] [--connections 16]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bastion.demo import build_demo, infer_request  # noqa: E402

REDIS_URL = "redis://127.0.0.1:6379/14"
POSTGRES_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"

BENCH_ROLE = """
# Benchmark principal: limits far above what one core can serve, so the limiter runs but never refuses.
[roles.bench]
rate = 1000000000
burst = 1000000000
daily_quota = 1000000000000
grants = [ { models = ["*"], actions = ["infer", "metadata"], output = "probabilities" } ]
"""


def create_key(config: Path, role: str = "bench") -> str:
    """A new API key for `role` in `config`'s deployment, through the CLI (printed once)."""
    command = [sys.executable, "-m", "bastion.cli", "keys", "create", "--config", str(config)]
    done = subprocess.run(
        [*command, "--name", "bench", "--role", role], capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def bench_policy(build_config: Path) -> str:
    """The demo's policy with the bench role, and query auditing on but alerting only: a benchmark's
    own near-identical rows would otherwise, rightly, get its key quarantined."""
    return (build_config.read_text() + BENCH_ROLE).replace(
        'trusted_keys = ["keys/release.pub"]\n',
        'trusted_keys = ["keys/release.pub"]\nextraction_watch = "alert"\n',
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(config: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    cmd = [
        "taskset",
        "-c",
        "0",
        sys.executable,
        "-m",
        "bastion.cli",
        "serve",
        "--config",
        str(config),
        "--port",
        str(port),
        "--log-level",
        "warning",
        *extra,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/live", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("server did not start")


def parse_wrk(out: str) -> dict[str, float]:
    try:
        return _parse_wrk(out)
    except AttributeError:
        raise SystemExit(f"could not read wrk's output:\n{out}") from None


def _parse_wrk(out: str) -> dict[str, float]:
    def duration(text: str) -> float:
        value, unit = re.match(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}[unit]

    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "p50": duration(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1)),  # type: ignore[union-attr]
        "p99": duration(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1)),  # type: ignore[union-attr]
        "errors": float(non2xx.group(1)) if non2xx else 0.0,
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_wrk(url: str, body: Path, key: str, seconds: int, connections: int, script: str) -> dict[str, float]:
    env = {**os.environ, "BASTION_BENCH_BODY": str(body), "BASTION_BENCH_KEY": key}
    out = subprocess.run(
        [
            "taskset",
            "-c",
            "1",
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            "--latency",
            "-s",
            str(ROOT / "bench" / script),
            url,
        ],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    return parse_wrk(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rows", type=int, default=1, help="rows per request")
    parser.add_argument(
        "--audit",
        choices=["fsync", "no-fsync", "best-effort"],
        default="fsync",
        help="audit durability for the defended server (default: the shipped default, fsync)",
    )
    parser.add_argument(
        "--state",
        choices=["sqlite", "memory", "redis", "postgres"],
        default="sqlite",
        help="where quotas and budgets live (redis: 127.0.0.1:6379 database 14; postgres: 127.0.0.1:5432)",
    )
    parser.add_argument(
        "--policy",
        choices=["label", "top_k", "rounded", "reverse_sigmoid", "dp_scores"],
        help="instead of on vs off: defenses on with full probabilities vs with this output policy "
        "(every request distinct, so dp_scores pays noise and budget each time)",
    )
    parser.add_argument(
        "--distinct",
        action="store_true",
        help="every request a new row (infer_jitter.lua), so that query auditing and the answer cache "
        "see new rows; implied by --policy",
    )
    parser.add_argument(
        "--watch",
        action="store_true",
        help="instead of on vs off: defenses on with query auditing off vs on (alert), every request a new row",
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: `apt-get install wrk` (make bench does it)")

    work = Path(tempfile.mkdtemp(prefix="bastion-bench-"))
    build = build_demo(work / "demo")
    text = bench_policy(build.config_path)
    if args.audit == "no-fsync":
        text = text.replace('durability = "sync"', 'durability = "sync"\nfsync = false')
    elif args.audit == "best-effort":
        text = text.replace('durability = "sync"', 'durability = "best_effort"')
    text = text.replace('backend = "sqlite"', f'backend = "{args.state}"')
    if args.state == "redis":
        prefix = f"bastion-bench-{os.getpid()}:"
        text = text.replace(
            'backend = "redis"', f'backend = "redis"\nredis_url = "{REDIS_URL}"\nredis_prefix = "{prefix}"'
        )
    if args.state == "postgres":
        table = f"bastion_bench_{os.getpid()}"
        text = text.replace('backend = "postgres"', f'backend = "postgres"\npostgres_table = "{table}"')
        text = text.replace('postgres_table = "', f'postgres_dsn = "{POSTGRES_DSN}"\npostgres_table = "', 1)
    build.config_path.write_text(text)
    request = infer_request(build.features[: args.rows])
    script = "infer.lua"
    if args.policy is not None or args.distinct or args.watch:
        request["inputs"][0]["data"][0] = "__X__"
        script = "infer_jitter.lua"
    body = work / "request.json"
    body.write_text(json.dumps(request).replace('"__X__"', "__X__"))

    # (name, config, extra serve arguments); the ratio printed is the second over the first.
    servers = [("off", build.config_path, ("--unsafe-no-defenses",)), ("on", build.config_path, ())]
    if args.policy is not None:
        policy_config = build.config_path.with_name("policy.toml")
        policy_text = text.replace('state_dir = "state"', 'state_dir = "state-policy"')
        policy_text = policy_text.replace(
            'grants = [ { models = ["*"], actions = ["infer", "metadata"], output = "probabilities" } ]',
            f'grants = [ {{ models = ["*"], actions = ["infer", "metadata"], output = "{args.policy}"'
            # A budget only where the policy spends one: on any other grant it is refused at start-up.
            + (", privacy_budget = 1e12" if args.policy in ("dp_scores", "private_prediction") else "")
            + " } ]",
        )
        policy_config.write_text(policy_text)
        servers = [("probabilities", build.config_path, ()), (args.policy, policy_config, ())]
    if args.watch:
        unwatched = build.config_path.with_name("unwatched.toml")
        unwatched.write_text(
            text.replace('state_dir = "state"', 'state_dir = "state-unwatched"').replace(
                'extraction_watch = "alert"', 'extraction_watch = "off"'
            )
        )
        servers = [("watch off", unwatched, ()), ("watch on", build.config_path, ())]
    keys = {config: create_key(config) for _, config, _ in servers}
    results: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in servers}
    for rnd in range(args.rounds):
        for name, config, extra in servers:
            port = free_port()
            proc = start(config, port, *extra)
            key = keys[config]
            try:
                url = f"http://127.0.0.1:{port}/v2/models/breast-cancer/infer"
                run_wrk(url, body, key, 2, args.connections, script)  # warm-up
                cpu_before = cpu_seconds(proc.pid)
                r = run_wrk(url, body, key, args.seconds, args.connections, script)
                r["cpu_us"] = (cpu_seconds(proc.pid) - cpu_before) / (r["rps"] * args.seconds) * 1e6
            finally:
                proc.terminate()
                proc.wait()
            if r["errors"]:
                raise SystemExit(f"{name}: {int(r['errors'])} non-2xx responses: the comparison is void")
            results[name].append(r)
            print(
                f"round {rnd + 1} {name:>15}: {r['rps']:8.0f} req/s  p50 {r['p50']:6.2f} ms  "
                f"p99 {r['p99']:6.2f} ms  server CPU {r['cpu_us']:5.0f} us/req",
                flush=True,
            )

    def med(name: str, field: str) -> float:
        return statistics.median(r[field] for r in results[name])

    (base, _, _), (other, _, _) = servers
    print()
    print(f"{'':18}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'CPU us/req':>12}")
    for name in (base, other):
        print(
            f"{name:<18}{med(name, 'rps'):>10.0f}{med(name, 'p50'):>10.2f}{med(name, 'p99'):>10.2f}"
            f"{med(name, 'cpu_us'):>12.0f}"
        )
    label = f"ratio {other}/{base}"
    print(
        f"{label:<18}{med(other, 'rps') / med(base, 'rps'):>10.3f}"
        f"{med(other, 'p50') / med(base, 'p50'):>10.2f}{med(other, 'p99') / med(base, 'p99'):>10.2f}"
        f"{med(other, 'cpu_us') / med(base, 'cpu_us'):>12.2f}"
    )
    print(
        f"\n(median of {args.rounds} rounds of {args.seconds} s, {args.connections} connections, "
        f"{args.rows} row(s) per request, audit {args.audit}, state {args.state}; "
        "server on CPU 0, wrk on CPU 1)"
    )
    shutil.rmtree(work, ignore_errors=True)
    _drop_shared_state(args.state)


def _drop_shared_state(state: str) -> None:
    """The bench's ledger in Redis or PostgreSQL is scratch: remove it."""
    if state == "redis":
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"bastion-bench-{os.getpid()}:*"))
        if keys:
            client.delete(*keys)
    elif state == "postgres":
        import psycopg

        with psycopg.connect(POSTGRES_DSN) as conn:
            conn.execute(f"DROP TABLE IF EXISTS bastion_bench_{os.getpid()}")


if __name__ == "__main__":
    main()
