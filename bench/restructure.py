"""Two code trees side by side on the V2 REST JSON path, every defense on, in-process (issue #10).

Two versions of `bastion` cannot share one interpreter, so each round starts one child process per
tree (PYTHONPATH = that tree's `src`), in turn: before, after, before, after, ... . A child builds the
demo deployment with its own tree's `bastion.demo.build_demo`, keeps only the V2 models (the /v1
language model of later trees is cut, so both trees serve the same policy file, checked by digest),
adds bench/load.py's bench role with query auditing alerting (bench/load.py's "on" server), and
calls the ASGI app (`bastion.http.app.BastionApp`: routing, context, every stage, the audit write,
JSON encoding; no socket) with 16 concurrent tasks, the same jittered one-row request sequence on
every side (a fixed seed), as bench/inprocess.py does. It reports CPU time per request (all threads),
requests per wall second and per-request latency (p50, p99: at 16 in flight, so queueing included).

    nice -n 10 .venv/bin/python bench/restructure.py \\
        --tree before=/tmp/bastion-before/src --tree after=src --rounds 5

Only APIs both trees have: build_demo, infer_request, load_config, Bastion(config, config_path=),
startup/aclose, BastionApp(service), `bastion keys create`. Children run pinned to --cpu.

`--callgrind` counts instructions instead of timing, so the machine's load cannot move the figure:
for each tree the deployment is prepared natively (a fresh one per run), then the same in-process
child runs under `valgrind --tool=callgrind` twice, with --warmup batches then N and then 2N measured
requests (N = --batches x --batch-size; PYTHONHASHSEED=0, the same seeded requests). Start-up,
warm-up and shutdown are the same in both runs, so (Ir(2N) - Ir(N)) / N is the steady-state
instructions per request, every thread included. `--annotate K` prints the K functions (self
instructions, `callgrind_annotate`, the same difference) whose cost per request grew the most.

    .venv/bin/python bench/restructure.py --callgrind --tree before=/tmp/bastion-before/src \
        --tree after=src --warmup 2 --batches 2 --batch-size 250 --annotate 25
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import MutableMapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PATH = b"/v2/models/breast-cancer/infer"
# bench/load.py's bench role, copied so the child imports nothing from a bench script of either tree.
BENCH_ROLE = """
# Benchmark principal: limits far above what one core can serve, so the limiter runs but never refuses.
[roles.bench]
rate = 1000000000
burst = 1000000000
daily_quota = 1000000000000
grants = [ { models = ["*"], actions = ["infer", "metadata"], output = "probabilities" } ]
"""
CLI = (sys.executable, "-m", "bastion.cli")
WATCHED = 'trusted_keys = ["keys/release.pub"]\n'


def v2_only(text: str) -> str:
    """The demo policy without the /v1 language model and its chat grant (absent from older trees)."""
    out, skip = [], False
    for line in text.splitlines(keepends=True):
        if line.startswith(("# ...and may chat", "# A language model on /v1")):
            skip = True
        elif skip and line.startswith("# Admins"):
            skip = False
        if not skip:
            out.append(line)
    return "".join(out).rstrip("\n") + "\n"


def prepare(root: Path) -> tuple[Path, str, str, Any]:
    """The deployment in `root`: (policy file, its text, the bench key, the demo's features)."""
    from bastion.demo import build_demo

    build = build_demo(root / "demo")
    text = (v2_only(build.config_path.read_text()) + BENCH_ROLE).replace(
        WATCHED, WATCHED + 'extraction_watch = "alert"\n'
    )
    build.config_path.write_text(text)
    done = subprocess.run(
        [*CLI, "keys", "create", "--config", str(build.config_path), "--name", "bench", "--role", "bench"],
        capture_output=True,
        text=True,
        check=True,
    )
    return build.config_path, text, done.stdout.strip(), build.features


async def child(args: argparse.Namespace) -> dict[str, Any]:
    import bastion
    from bastion.config import load_config
    from bastion.demo import infer_request
    from bastion.http.app import BastionApp
    from bastion.service import Bastion

    if args.measure:  # --callgrind: a deployment prepared outside valgrind by --prepare
        side = json.loads(Path(args.measure).read_text())
        config, key = Path(side["config"]), side["key"]
        text = config.read_text()
        raw = Path(side["body"]).read_text().replace("__X__", '"__X__"')
    else:
        config, text, key, features = prepare(Path(tempfile.mkdtemp(prefix="bastion-restructure-")))
        template = infer_request(features[:1])
        template["inputs"][0]["data"][0] = "__X__"
        raw = json.dumps(template)
    rng = random.Random(args.seed)
    total = (args.warmup + args.batches) * args.batch_size
    values = list(dict.fromkeys(f"{17.5 + rng.random():.6f}" for _ in range(total + 1000)))[:total]
    payloads = [raw.replace('"__X__"', v).encode() for v in values]

    service = Bastion(load_config(config), config_path=config)
    app = BastionApp(service)
    await service.startup()
    gc.collect()
    gc.freeze()
    headers = [(b"authorization", f"Bearer {key}".encode()), (b"content-type", b"application/json")]

    async def one(payload: bytes) -> float:
        scope = {
            "type": "http",
            "method": "POST",
            "path": PATH.decode(),
            "raw_path": PATH,
            "query_string": b"",
            "headers": [*headers, (b"content-length", str(len(payload)).encode())],
            "client": ("127.0.0.1", 40000),
            "server": ("127.0.0.1", 8000),
            "scheme": "http",
            "http_version": "1.1",
        }
        sent = False
        status = 0

        async def receive() -> MutableMapping[str, Any]:
            nonlocal sent
            if sent:
                await asyncio.Event().wait()  # as a server does: nothing more until disconnect
            sent = True
            return {"type": "http.request", "body": payload, "more_body": False}

        async def send(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]

        began = time.perf_counter()
        await app(scope, receive, send)
        elapsed = time.perf_counter() - began
        if status != 200:
            raise SystemExit(f"status {status}: the comparison is void")
        return elapsed

    cpu = wall = 0.0
    latencies: list[float] = []
    for batch in range(args.warmup + args.batches):
        part = payloads[batch * args.batch_size : (batch + 1) * args.batch_size]

        async def worker(chunk: list[bytes]) -> list[float]:
            return [await one(p) for p in chunk]

        c0, w0 = time.process_time(), time.perf_counter()
        results = await asyncio.gather(
            *(worker(part[i :: args.concurrency]) for i in range(args.concurrency))
        )
        c1, w1 = time.process_time(), time.perf_counter()
        if batch >= args.warmup:
            cpu += c1 - c0
            wall += w1 - w0
            latencies.extend(x for r in results for x in r)
    await service.aclose()
    if not args.measure:
        shutil.rmtree(config.parent.parent, ignore_errors=True)
    latencies.sort()
    n = len(latencies)
    return {
        "bastion": bastion.__file__,
        "config_sha256": hashlib.sha256(text.encode()).hexdigest()[:16],
        "requests": n,
        "cpu_us": cpu / n * 1e6,
        "rps": n / wall,
        "p50_ms": latencies[n // 2] * 1e3,
        "p99_ms": latencies[min(n - 1, int(n * 0.99))] * 1e3,
        "loadavg": os.getloadavg()[0],
    }


def parent(args: argparse.Namespace) -> None:
    trees = [tuple(t.split("=", 1)) for t in args.tree]
    results: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in trees}
    forward = ["--warmup", str(args.warmup), "--batches", str(args.batches)]
    forward += ["--batch-size", str(args.batch_size), "--concurrency", str(args.concurrency)]
    forward += ["--seed", str(args.seed)]
    began = time.time()
    loads = [os.getloadavg()[0]]
    for rnd in range(args.rounds):
        for name, src in trees:
            env = {**os.environ, "PYTHONPATH": str(Path(src).resolve())}
            cmd = ["taskset", "-c", str(args.cpu), sys.executable, __file__, "--child", *forward]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"{name}: child failed:\n{done.stderr[-3000:]}")
            r = json.loads(done.stdout.strip().splitlines()[-1])
            if not r["bastion"].startswith(str(Path(src).resolve())):
                raise SystemExit(f"{name}: imported {r['bastion']}, not {src}")
            results[name].append(r)
            loads.append(r["loadavg"])
            print(
                f"round {rnd + 1} {name:>8}: {r['cpu_us']:7.1f} us CPU/req {r['rps']:7.0f} req/s "
                f"p50 {r['p50_ms']:6.2f} ms p99 {r['p99_ms']:6.2f} ms  load {r['loadavg']:.2f}  "
                f"config {r['config_sha256']}  {r['bastion']}",
                flush=True,
            )
    digests = {r["config_sha256"] for rs in results.values() for r in rs}
    if len(digests) != 1:
        raise SystemExit(f"the trees served different policy files ({digests}): the comparison is void")

    def med(name: str, field: str) -> float:
        return float(statistics.median(r[field] for r in results[name]))

    base = trees[0][0]
    fields = ("cpu_us", "rps", "p50_ms", "p99_ms")
    print(f"\n{'':20}{'CPU us/req':>11}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}")
    for name, _ in trees:
        print(
            f"{name:<20}"
            + "".join(
                f"{med(name, f):>{w}.{d}f}"
                for f, w, d in zip(fields, (11, 9, 9, 9), (1, 0, 2, 2), strict=True)
            )
        )
    for other, _ in trees[1:]:
        label = f"ratio {other}/{base}"
        print(
            f"{label:<20}"
            + "".join(
                f"{med(other, f) / med(base, f):>{w}.3f}" for f, w in zip(fields, (11, 9, 9, 9), strict=True)
            )
        )
    print(
        f"\n(median of {args.rounds} rounds; each {args.batches} batches of {args.batch_size} after "
        f"{args.warmup} warm-up, {args.concurrency} in flight, CPU {args.cpu}; load average "
        f"{min(loads):.2f}-{max(loads):.2f}; {time.time() - began:.0f} s)"
    )


def callgrind_run(src: str, batches: int, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """One child under callgrind on a fresh deployment of tree `src`: its JSON and total Ir."""
    env = {**os.environ, "PYTHONPATH": str(Path(src).resolve()), "PYTHONHASHSEED": "0"}
    # BLAS pools busy-wait for work: their spin would count wall time, not the request's work.
    env |= {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    root = Path(tempfile.mkdtemp(prefix="bastion-restructure-cg-"))
    try:
        done = subprocess.run(
            [sys.executable, __file__, "--prepare", str(root)],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise SystemExit(f"{src}: prepare failed:\n{done.stderr[-3000:]}")
        (root / "side.json").write_text(done.stdout.strip().splitlines()[-1])
        forward = ["--warmup", str(args.warmup), "--batches", str(batches)]
        forward += ["--batch-size", str(args.batch_size), "--concurrency", str(args.concurrency)]
        forward += ["--seed", str(args.seed), "--measure", str(root / "side.json")]
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable]
        done = subprocess.run(
            [*cmd, __file__, "--child", *forward], env=env, capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise SystemExit(f"{src}: child failed under callgrind:\n{done.stderr[-3000:]}")
        r: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if not r["bastion"].startswith(str(Path(src).resolve())):
        raise SystemExit(f"{src}: imported {r['bastion']}, not {src}")
    for line in out.read_text(errors="replace").splitlines():
        if line.startswith(("totals:", "summary:")):
            r["ir"] = int(line.split()[1])
    return r


def annotate(out: Path) -> dict[str, int]:
    """Self instructions by function (file:function) in one callgrind profile."""
    done = subprocess.run(
        ["callgrind_annotate", "--inclusive=no", "--threshold=100", str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    table: dict[str, int] = {}
    for line in done.stdout.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[0].replace(",", "").isdigit() and ":" in parts[1]:
            name = parts[1].split(") ", 1)[-1] if parts[1].startswith("(") else parts[1]
            name = name.split(" [", 1)[0].strip()
            name = name.rsplit("/", 1)[-1] if "/" in name.split(":", 1)[0] else name
            table[name] = table.get(name, 0) + int(parts[0].replace(",", ""))
    return table


def onnxruntime_ir(out: Path) -> int:
    """Instructions in onnxruntime's library in one profile. Its thread pool spins for a while at
    times that depend on wall time, a once-a-run burst of 20-50 million Ir that lands in one run or
    the other; so the figure without it is the repeatable one (the model's own run is a few thousand)."""
    done = subprocess.run(
        ["callgrind_annotate", "--inclusive=no", "--threshold=100", str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    total = 0
    for line in done.stdout.splitlines():
        parts = line.split(None, 1)
        if (
            len(parts) == 2
            and parts[0].replace(",", "").isdigit()
            and "onnxruntime" in parts[1].rsplit("[", 1)[-1]
        ):
            total += int(parts[0].replace(",", ""))
    return total


def callgrind(args: argparse.Namespace) -> None:
    trees = [tuple(t.split("=", 1)) for t in args.tree]
    outdir = Path(args.callgrind_dir or tempfile.mkdtemp(prefix="bastion-restructure-cg-out-"))
    outdir.mkdir(parents=True, exist_ok=True)
    n = args.batches * args.batch_size
    per: dict[str, float] = {}
    bare: dict[str, float] = {}
    profiles: dict[str, dict[str, float]] = {}
    digests = set()
    began = time.time()
    jobs = [(name, src, batches) for name, src in trees for batches in (args.batches, 2 * args.batches)]
    outs = {job: outdir / f"callgrind.{job[0]}.{job[2] * args.batch_size}" for job in jobs}
    with ThreadPoolExecutor(args.jobs) as pool:  # instruction counts do not depend on the sharing
        done = dict(
            zip(jobs, pool.map(lambda j: callgrind_run(j[1], j[2], args, outs[j]), jobs), strict=True)
        )
    for job in jobs:
        r = done[job]
        digests.add(r["config_sha256"])
        print(
            f"{job[0]:>12}: {r['requests']:5d} measured requests, {r['ir']:>15,} Ir in all  "
            f"config {r['config_sha256']}  {r['bastion']}  ({outs[job]})",
            flush=True,
        )
    for name, src in trees:
        runs = [(done[(name, src, b)], outs[(name, src, b)]) for b in (args.batches, 2 * args.batches)]
        (small, small_out), (large, large_out) = runs
        per[name] = (large["ir"] - small["ir"]) / n
        bare[name] = per[name] - (onnxruntime_ir(large_out) - onnxruntime_ir(small_out)) / n
        if args.annotate:
            a, b = annotate(small_out), annotate(large_out)
            profiles[name] = {f: (b.get(f, 0) - a.get(f, 0)) / n for f in set(a) | set(b)}
    if len(digests) != 1:
        raise SystemExit(f"the trees served different policy files ({digests}): the comparison is void")
    base = trees[0][0]
    print(f"\n{'':24}{'Ir/request':>14}{'ratio':>8}{'without onnxruntime':>22}{'ratio':>8}")
    for name, _ in trees:
        print(
            f"{name:<24}{per[name]:>14,.0f}{per[name] / per[base]:>8.3f}"
            f"{bare[name]:>22,.0f}{bare[name] / bare[base]:>8.3f}"
        )
    print(
        f"\n(instructions per request = (Ir({2 * n}) - Ir({n})) / {n}; {args.warmup} warm-up batches "
        f"of {args.batch_size}, {args.concurrency} in flight, seed {args.seed}, PYTHONHASHSEED=0; "
        f"config {digests.pop()}; profiles in {outdir}; {time.time() - began:.0f} s)"
    )
    for other, _ in trees[1:] if args.annotate else []:
        old, new = profiles[base], profiles[other]
        grown = sorted(((new.get(f, 0.0) - old.get(f, 0.0), f) for f in set(old) | set(new)), reverse=True)
        k = args.annotate
        print(f"\nself Ir/request, {other} - {base} (the {k} that grew most, then the {k} that shrank most):")
        for delta, f in grown[:k] + grown[-k:]:
            print(f"{delta:>+12,.0f}  {old.get(f, 0.0):>10,.0f} -> {new.get(f, 0.0):>10,.0f}  {f}")


def callgrind_http_run(src: str, server: str, count: int, args: argparse.Namespace, out: Path) -> int:
    """`bench/frontend.py --serve SERVER` of tree `src` under callgrind, sent --warmup x --batch-size
    then `count` requests one after another on one keep-alive connection; its total Ir."""
    import http.client
    import signal
    import socket

    env = {**os.environ, "PYTHONPATH": str(Path(src).resolve()), "PYTHONHASHSEED": "0"}
    env |= {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    root = Path(tempfile.mkdtemp(prefix="bastion-restructure-cgh-"))
    try:
        done = subprocess.run(
            [sys.executable, __file__, "--prepare", str(root)],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise SystemExit(f"{src}: prepare failed:\n{done.stderr[-3000:]}")
        side = json.loads(done.stdout.strip().splitlines()[-1])
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable]
        cmd += [str(ROOT / "bench" / "frontend.py"), "--serve", server, "--config", side["config"]]
        proc = subprocess.Popen(
            [*cmd, "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            for _ in range(900):  # a bare TCP connect every 2 s, not a request: its cost is a few accepts
                time.sleep(2)
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=5):
                    break
            else:
                raise SystemExit(f"{server}: not listening after 30 min")
            rng = random.Random(args.seed)
            total = args.warmup * args.batch_size + count
            values = list(dict.fromkeys(f"{17.5 + rng.random():.6f}" for _ in range(total + 1000)))[:total]
            raw = Path(side["body"]).read_text()
            headers = {"authorization": f"Bearer {side['key']}", "content-type": "application/json"}
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            for v in values:
                conn.request("POST", PATH.decode(), raw.replace("__X__", v).encode(), headers)
                answer = conn.getresponse()
                answer.read()
                if answer.status != 200:
                    raise SystemExit(f"{server}: status {answer.status}: the comparison is void")
            conn.close()
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for line in out.read_text(errors="replace").splitlines():
        if line.startswith(("totals:", "summary:")):
            return int(line.split()[1])
    raise SystemExit(f"{server}: no totals in {out}")


def callgrind_http(args: argparse.Namespace) -> None:
    """Issue 9's front end alone: one tree's BastionApp under stock uvicorn + httptools (frontend.py's
    "old", as `bastion serve` ran before 44facba) and under `bastion serve`'s own front end."""
    name, src = args.tree[-1].split("=", 1)
    outdir = Path(args.callgrind_dir or tempfile.mkdtemp(prefix="bastion-restructure-cg-out-"))
    outdir.mkdir(parents=True, exist_ok=True)
    n = args.batches * args.batch_size
    jobs = [(server, count) for server in ("old", "bastion") for count in (n, 2 * n)]
    outs = {job: outdir / f"callgrind.http.{name}.{job[0]}.{job[1]}" for job in jobs}
    began = time.time()
    with ThreadPoolExecutor(args.jobs) as pool:
        irs = dict(
            zip(
                jobs,
                pool.map(lambda j: callgrind_http_run(src, j[0], j[1], args, outs[j]), jobs),
                strict=True,
            )
        )
    per = {server: (irs[(server, 2 * n)] - irs[(server, n)]) / n for server in ("old", "bastion")}
    ort = {
        s: (onnxruntime_ir(outs[(s, 2 * n)]) - onnxruntime_ir(outs[(s, n)])) / n for s in ("old", "bastion")
    }
    bare = {s: per[s] - ort[s] for s in per}
    for job in jobs:
        print(f"{name} {job[0]:>8}: {job[1]:5d} measured requests, {irs[job]:>15,} Ir in all  ({outs[job]})")
    print(
        f"\n{'server (' + name + ')':<32}{'Ir/request':>14}{'ratio':>8}{'without onnxruntime':>22}{'ratio':>8}"
    )
    for s, label in (("old", "uvicorn + httptools (old)"), ("bastion", "bastion serve front end")):
        print(
            f"{label:<32}{per[s]:>14,.0f}{per[s] / per['old']:>8.3f}{bare[s]:>22,.0f}{bare[s] / bare['old']:>8.3f}"
        )
    print(
        f"\n(server process only, under callgrind; (Ir({2 * n}) - Ir({n})) / {n}; one keep-alive connection, "
        f"requests one after another after {args.warmup * args.batch_size} warm-up; {time.time() - began:.0f} s)"
    )


def http(args: argparse.Namespace) -> None:
    """bench/load.py's harness (its server start, pinning, wrk run and CPU reading) on each tree."""
    sys.path.insert(0, str(ROOT / "bench"))
    import load

    trees = [tuple(t.split("=", 1)) for t in args.tree]
    sides = {}
    for name, src in trees:
        env = {**os.environ, "PYTHONPATH": str(Path(src).resolve())}
        root = tempfile.mkdtemp(prefix="bastion-restructure-http-")
        done = subprocess.run(
            [sys.executable, __file__, "--prepare", root],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise SystemExit(f"{name}: prepare failed:\n{done.stderr[-3000:]}")
        side = json.loads(done.stdout.strip().splitlines()[-1])
        if not side["bastion"].startswith(str(Path(src).resolve())):
            raise SystemExit(f"{name}: imported {side['bastion']}, not {src}")
        print(f"{name}: {side['bastion']}, config {side['config_sha256']}", flush=True)
        sides[name] = (env["PYTHONPATH"], side)
    if len({side["config_sha256"] for _, side in sides.values()}) != 1:
        raise SystemExit("the trees served different policy files: the comparison is void")
    results: dict[str, list[dict[str, float]]] = {name: [] for name, _ in trees}
    began = time.time()
    loads = [os.getloadavg()[0]]
    for rnd in range(args.rounds):
        for name, _ in trees:
            pythonpath, side = sides[name]
            os.environ["PYTHONPATH"] = pythonpath  # load.start's server inherits it
            try:
                port = load.free_port()
                proc = load.start(Path(side["config"]), port)
            except SystemExit:  # once seen on the loaded machine (a port race or a slow start): again
                port = load.free_port()
                proc = load.start(Path(side["config"]), port)
            try:
                url = f"http://127.0.0.1:{port}/v2/models/breast-cancer/infer"
                body = Path(side["body"])
                load.run_wrk(url, body, side["key"], 2, args.connections, "infer_jitter.lua")  # warm-up
                cpu_before = load.cpu_seconds(proc.pid)
                r = load.run_wrk(url, body, side["key"], args.seconds, args.connections, "infer_jitter.lua")
                r["cpu_us"] = (load.cpu_seconds(proc.pid) - cpu_before) / (r["rps"] * args.seconds) * 1e6
            finally:
                proc.terminate()
                proc.wait()
            if r["errors"]:
                raise SystemExit(f"{name}: {int(r['errors'])} non-2xx responses: the comparison is void")
            r["load"] = os.getloadavg()[0]
            loads.append(r["load"])
            results[name].append(r)
            print(
                f"round {rnd + 1} {name:>8}: {r['rps']:7.0f} req/s p50 {r['p50']:6.2f} ms "
                f"p99 {r['p99']:6.2f} ms server CPU {r['cpu_us']:5.0f} us/req  load {r['load']:.2f}",
                flush=True,
            )

    for _, side in sides.values():
        shutil.rmtree(Path(side["config"]).parent.parent, ignore_errors=True)

    def med(name: str, field: str) -> float:
        return float(statistics.median(r[field] for r in results[name]))

    base = trees[0][0]
    fields = ("rps", "p50", "p99", "cpu_us")
    print(f"\n{'':20}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'CPU us/req':>11}")
    for name, _ in trees:
        print(
            f"{name:<20}"
            + "".join(
                f"{med(name, f):>{w}.{d}f}"
                for f, w, d in zip(fields, (9, 9, 9, 11), (0, 2, 2, 0), strict=True)
            )
        )
    for other, _ in trees[1:]:
        label = f"ratio {other}/{base}"
        print(
            f"{label:<20}"
            + "".join(
                f"{med(other, f) / med(base, f):>{w}.3f}" for f, w in zip(fields, (9, 9, 9, 11), strict=True)
            )
        )
    print(
        f"\n(median of {args.rounds} rounds of {args.seconds} s, {args.connections} connections, wrk "
        f"infer_jitter.lua; server on CPU 0, wrk on CPU 1; load average {min(loads):.2f}-{max(loads):.2f}; "
        f"{time.time() - began:.0f} s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tree",
        action="append",
        default=[],
        help="NAME=SRC_DIR; two or more, in order (ratios are to the first)",
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seed", type=int, default=10)
    parser.add_argument("--cpu", type=int, default=0, help="the core every child is pinned to")
    parser.add_argument("--http", action="store_true", help="over HTTP with wrk, as bench/load.py runs it")
    parser.add_argument("--seconds", type=int, default=10, help="--http: seconds per round")
    parser.add_argument("--connections", type=int, default=16, help="--http: wrk connections")
    parser.add_argument("--callgrind", action="store_true", help="instructions per request under callgrind")
    parser.add_argument(
        "--callgrind-http",
        action="store_true",
        help="the last tree under uvicorn vs its own front end, in Ir",
    )
    parser.add_argument("--jobs", type=int, default=2, help="--callgrind: children run at once")
    parser.add_argument("--callgrind-dir", help="--callgrind: where the profiles are kept")
    parser.add_argument(
        "--annotate", type=int, default=0, help="--callgrind: name the K functions that grew most"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--prepare", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(child(args))))
    elif args.prepare:
        import bastion
        from bastion.demo import infer_request

        config, text, key, features = prepare(Path(args.prepare))
        request = infer_request(features[:1])
        request["inputs"][0]["data"][0] = "__X__"
        body = Path(args.prepare) / "request.json"
        body.write_text(json.dumps(request).replace('"__X__"', "__X__"))
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        print(
            json.dumps(
                {
                    "bastion": bastion.__file__,
                    "config": str(config),
                    "key": key,
                    "body": str(body),
                    "config_sha256": digest,
                }
            )
        )
    elif args.callgrind_http and args.tree:
        callgrind_http(args)
    elif len(args.tree) < 2:
        parser.error("give --tree NAME=SRC at least twice")
    elif args.http:
        http(args)
    elif args.callgrind:
        callgrind(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
