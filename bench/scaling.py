"""Scaling: Bastion with 1, 2 and 4 workers, 1 to 3 replicas behind HAProxy, and MLServer with the
same model and worker counts, in one run (issue 13).

Every Bastion defense is on (authentication, limits and quotas leased from Redis, authorization,
input guard with its out-of-distribution screen, query auditing in alert mode, output policy,
audit log in sync durability with fsync): the policy of bench/load.py. Bastion's state is in
Redis, the audit chain per replica in SQLite. The replicas run as hosts in network namespaces
(tests/netlab.py): Bastion on host 1 with `--workers N` (wrk straight to it), then 1-3 replicas of
one worker each behind HAProxy (roundrobin, health checks). MLServer 1.7 serves the same
scikit-learn pipeline (the demo's, pickled with joblib) from its own venv, bench/.venv-mlserver
(created from bench/requirements-mlserver.txt when missing), with default settings except its
ports and `parallel_workers` = N.

The requests (one row each, the same row) take 16 API keys in turn, as many clients would (one
key for all would measure one principal's query-auditing history under contention). wrk (one
thread, no pinning) shares the machine's cores with the servers and HAProxy; the machine's load
average before and after is printed with the table. Every setup runs once per round; the table
gives medians.

    .venv/bin/python bench/scaling.py [--rounds 3] [--seconds 10] [--connections 16]
        [--workers 1 2 4] [--replicas 1 2 3] [--principals 16] [--no-mlserver] [--json out.json]
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
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import joblib
from load import BENCH_ROLE, create_key, parse_wrk

from bastion.demo import _train, build_demo, infer_request

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.netlab import Lab, free_port, network_lab, stop_process, wait_for_port  # noqa: E402

MLSERVER_VENV = ROOT / "bench" / ".venv-mlserver"
MLSERVER_REQUIREMENTS = ROOT / "bench" / "requirements-mlserver.txt"
INFER = "/v2/models/breast-cancer/infer"


def bastion_policy(demo_config: str, state: str) -> str:
    """The demo's policy with its ONNX breast-cancer model alone, the bench role of bench/load.py
    (limits that never refuse; full probabilities) and query auditing alerting only (a benchmark's
    identical rows would otherwise, rightly, get its key quarantined)."""
    head = demo_config[: demo_config.index("# Analysts may ask")]
    first = head.index("[[models]]")
    head = head[: head.index("[[models]]", first + 1)]
    head = head.replace(
        'trusted_keys = ["keys/release.pub"]\n',
        'trusted_keys = ["keys/release.pub"]\nextraction_watch = "alert"\n',
    )
    return head.replace('backend = "sqlite"', state) + BENCH_ROLE


def ensure_mlserver() -> Path:
    """bench/.venv-mlserver with the pinned MLServer; created (pip, PyPI) when missing."""
    mlserver = MLSERVER_VENV / "bin" / "mlserver"
    stamp = MLSERVER_VENV / ".installed"
    if mlserver.exists() and stamp.exists() and stamp.read_text() == MLSERVER_REQUIREMENTS.read_text():
        return mlserver
    print(f"creating {MLSERVER_VENV} from {MLSERVER_REQUIREMENTS.name} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(MLSERVER_VENV)], check=True)
    pip = [str(MLSERVER_VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "-r", str(MLSERVER_REQUIREMENTS)], check=True)
    stamp.write_text(MLSERVER_REQUIREMENTS.read_text())
    return mlserver


def wrk(url: str, body: Path, keys: list[str], seconds: int, connections: int) -> dict[str, object]:
    env = {**os.environ, "BASTION_BENCH_BODY": str(body), "BASTION_BENCH_KEYS": ",".join(keys)}
    command = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "--latency",
        "-s",
        str(ROOT / "bench" / "infer_status.lua"),
        url,
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    result: dict[str, object] = {**parse_wrk(done.stdout)}
    result["statuses"] = {code: int(n) for code, n in re.findall(r"^status (\d+) (\d+)$", done.stdout, re.M)}
    return result


def wait_ready(url: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} not ready in {timeout} s")


@contextmanager
def bastion_workers(lab: Lab, config: Path, workers: int) -> Iterator[str]:
    """Bastion on host 1 with `workers` workers; yields its inference URL."""
    extra = ("--workers", str(workers)) if workers > 1 else ()
    process = lab.start_replica(0, config, *extra)
    try:
        wait_ready(f"{lab.replica_url(0)}/v2/health/ready")
        yield lab.replica_url(0) + INFER
    finally:
        stop_process(process, timeout=30)


@contextmanager
def bastion_replicas(lab: Lab, configs: list[Path], count: int) -> Iterator[str]:
    """`count` replicas of one worker, behind a new HAProxy; yields HAProxy's inference URL."""
    processes = [lab.start_replica(i, configs[i]) for i in range(count)]
    port = free_port()
    lab.start_haproxy([f"{a}:8000" for a in lab.addresses[:count]], port=port)
    haproxy = lab.processes[-1]
    try:
        lab.wait_backends(port, up=count, timeout=30)
        yield f"http://127.0.0.1:{port}{INFER}"
    finally:
        stop_process(haproxy)
        for process in processes:
            stop_process(process, timeout=30)


@contextmanager
def mlserver(mlserver_bin: Path, model_dir: Path, workers: int) -> Iterator[str]:
    """MLServer with default settings but its ports and `parallel_workers`; yields its inference URL."""
    http, grpc, metrics = free_port(), free_port(), free_port()
    (model_dir / "settings.json").write_text(
        json.dumps(
            {"http_port": http, "grpc_port": grpc, "metrics_port": metrics, "parallel_workers": workers}
        )
    )
    log = (model_dir / f"mlserver-{workers}.log").open("wb")
    process = subprocess.Popen(
        [str(mlserver_bin), "start", str(model_dir)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=model_dir,
        start_new_session=True,
    )
    try:
        wait_for_port("127.0.0.1", http, timeout=120)
        wait_ready(f"http://127.0.0.1:{http}/v2/models/breast-cancer/ready")
        yield f"http://127.0.0.1:{http}{INFER}"
    finally:
        # MLServer's inference pool is its children: the whole session goes.
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


def mlserver_model(model_dir: Path) -> Path:
    """The demo's pipeline (scaler + logistic regression, as trained for its ONNX bundle) in the
    format MLServer's scikit-learn runtime loads (joblib; the same scikit-learn on both sides)."""
    model_dir.mkdir()
    pipeline, _, _ = _train()
    joblib.dump(pipeline, model_dir / "model.joblib")
    settings = {
        "name": "breast-cancer",
        "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": "./model.joblib", "version": "1"},
    }
    (model_dir / "model-settings.json").write_text(json.dumps(settings))
    return model_dir


def measure(
    name: str,
    url: str,
    body: Path,
    keys: list[str],
    args: argparse.Namespace,
    results: list[dict[str, object]],
) -> None:
    probe = httpx.post(
        url,
        content=body.read_bytes(),
        headers={"Authorization": f"Bearer {keys[0]}"} if keys else {},
        timeout=10,
    )
    if probe.status_code != 200:
        raise SystemExit(f"{name}: the probe request got {probe.status_code}: {probe.text[:300]}")
    wrk(url, body, keys, 2, args.connections)  # warm-up
    r = wrk(url, body, keys, args.seconds, args.connections)
    row: dict[str, object] = {"setup": name, **r}
    results.append(row)
    statuses = r["statuses"]
    assert isinstance(statuses, dict)
    flag = f"  NON-2XX: {statuses}" if set(statuses) - {"200"} else ""
    print(
        f"{name:<34} {r['rps']:8.0f} req/s  p50 {r['p50']:7.2f} ms  p99 {r['p99']:7.2f} ms{flag}", flush=True
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10)
    # 16: with more, a replica's shipped inference queue (inference_queue = 16 beyond its threads)
    # sheds the excess with 503, by design; the comparison is of served requests.
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--principals", type=int, default=16, help="API keys the requests take in turn")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--no-mlserver", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    for tool in ("wrk", "haproxy", "redis-server", "ip"):
        if shutil.which(tool) is None:
            raise SystemExit(
                f"{tool} not found: apt-get install wrk (scripts/ensure-netlab installs the others)"
            )
    mlserver_bin = None if args.no_mlserver else ensure_mlserver()

    work = Path(tempfile.mkdtemp(prefix="bastion-scaling-"))
    results: list[dict[str, object]] = []
    load_before = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    try:
        with network_lab(max(args.replicas), work / "lab") as lab:
            lab.start_redis()
            build = build_demo(work / "demo", llm=False)
            state = f'backend = "redis"\nredis_url = "{lab.redis_url}"\nredis_prefix = "bench:"'
            text = bastion_policy(build.config_path.read_text(), state)
            configs = []
            for i in range(max(args.replicas)):
                path = build.config_path.with_name(f"replica-{i + 1}.toml")
                path.write_text(text.replace('state_dir = "state"', f'state_dir = "state-{i + 1}"'))
                configs.append(path)
            # In Redis: every replica knows them. Requests take them in turn, as many clients would.
            with ThreadPoolExecutor(4) as pool:
                keys = list(pool.map(lambda _: create_key(configs[0]), range(args.principals)))
            body = work / "request.json"
            body.write_text(json.dumps(infer_request(build.features[:1])))
            model_dir = mlserver_model(work / "mlserver") if mlserver_bin is not None else None

            # Rounds: every setup once per round, so that the machine's drift (other work on the same
            # cores) falls on all of them; the table gives each setup's median.
            for rnd in range(args.rounds):
                print(f"round {rnd + 1} of {args.rounds}", flush=True)
                for n in args.workers:
                    with bastion_workers(lab, configs[0], n) as url:
                        measure(f"Bastion, {n} worker(s)", url, body, keys, args, results)
                for n in args.replicas:
                    with bastion_replicas(lab, configs, n) as url:
                        measure(f"Bastion, {n} replica(s) behind HAProxy", url, body, keys, args, results)
                if mlserver_bin is not None and model_dir is not None:
                    for n in args.workers:
                        with mlserver(mlserver_bin, model_dir, n) as url:
                            measure(f"MLServer, parallel_workers={n}", url, body, [], args, results)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()

    print()
    print("| setup | req/s | p50 ms | p99 ms | answers other than 200 |")
    print("|---|---|---|---|---|")
    for name in dict.fromkeys(str(row["setup"]) for row in results):
        rows = [row for row in results if row["setup"] == name]
        other: dict[str, int] = {}
        for row in rows:
            for code, n in row["statuses"].items():  # type: ignore[attr-defined]
                if code != "200":
                    other[code] = other.get(code, 0) + n
        med = {f: statistics.median(float(row[f]) for row in rows) for f in ("rps", "p50", "p99")}  # type: ignore[arg-type]
        print(
            f"| {name} | {med['rps']:.0f} | {med['p50']:.2f} | {med['p99']:.2f} | "
            f"{', '.join(f'{n} × {code}' for code, n in other.items()) or 'none'} |"
        )
    print(
        f"\n({started}; median of {args.rounds} round(s), {args.seconds} s per line after a 2 s warm-up, "
        f"{args.connections} connections, {args.principals} keys in turn, wrk -t1 unpinned on the same "
        f"{os.cpu_count()} cores; load average 1/5/15 min before "
        f"{'/'.join(f'{x:.1f}' for x in load_before)}, after {'/'.join(f'{x:.1f}' for x in load_after)})"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "started": started,
                    "load_before": load_before,
                    "load_after": load_after,
                    "results": results,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
