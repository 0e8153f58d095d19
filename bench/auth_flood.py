"""What an anonymous flood costs the audit log: records and bytes on disk per refused request.

Builds the demo deployment, starts the real server, then sends --probes requests that are refused
before identity (no credentials, a wrong scheme, a malformed key, an unknown key, a garbage token,
an unknown route, the token route with a bad key), --connections at a time, from one address
(127.0.0.2) or from --addresses consecutive ones (127.0.1.x). A keyed client on 127.0.0.1 asks
once a second throughout. Prints the audit database's growth (records, main file + WAL bytes), the
statuses the flood got and the keyed client's statuses and latency.

    .venv/bin/python bench/auth_flood.py [--probes 5000] [--connections 16] [--addresses 1]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from load import create_key  # noqa: E402

from bastion.demo import build_demo, infer_request  # noqa: E402

BASTION = [sys.executable, "-m", "bastion.cli"]
# One member of each kind refused before identity.
PROBES: list[tuple[str, str, dict[str, str]]] = [
    ("GET", "/v2/models/breast-cancer", {}),
    ("GET", "/v2/models/breast-cancer", {"Authorization": "Basic dXNlcjpwdw=="}),
    ("GET", "/v2/models/breast-cancer", {"Authorization": "Bearer bst_nonsense"}),
    (
        "POST",
        "/v2/models/breast-cancer/infer",
        {"Authorization": "Bearer " + "bst_" + "0" * 16 + "_" + "a" * 43},
    ),
    ("GET", "/v2", {"Authorization": "Bearer eyJhbGciOiJub25lIn0.e30."}),
    ("GET", "/v2/admin/secrets", {}),
    ("POST", "/v2/auth/token", {"Authorization": "Bearer bst_garbage"}),
]


def audit_size(state: Path) -> tuple[int, int]:
    db = state / "audit.db"
    size = sum(p.stat().st_size for p in (db, db.with_name("audit.db-wal")) if p.exists())
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        records = int(conn.execute("SELECT count(*) FROM records").fetchone()[0])
    finally:
        conn.close()
    return records, size


async def flood(base: str, probes: int, connections: int, addresses: int) -> collections.Counter[int]:
    statuses: collections.Counter[int] = collections.Counter()
    clients = [
        httpx.AsyncClient(
            base_url=base,
            timeout=30,
            transport=httpx.AsyncHTTPTransport(
                local_address="127.0.0.2" if addresses == 1 else f"127.0.{1 + i // 250}.{1 + i % 250}"
            ),
        )
        for i in range(addresses)
    ]
    counter = iter(range(probes))

    async def worker() -> None:
        for i in counter:
            method, path, headers = PROBES[i % len(PROBES)]
            r = await clients[i % addresses].request(method, path, headers=headers)
            statuses[r.status_code] += 1

    await asyncio.gather(*(worker() for _ in range(connections)))
    for c in clients:
        await c.aclose()
    return statuses


async def keyed(base: str, key: str, body: dict[str, object], stop: asyncio.Event) -> list[tuple[int, float]]:
    seen = []
    async with httpx.AsyncClient(base_url=base, timeout=30, headers={"Authorization": f"Bearer {key}"}) as c:
        while not stop.is_set():
            t = time.perf_counter()
            r = await c.post("/v2/models/breast-cancer/infer", json=body)
            seen.append((r.status_code, (time.perf_counter() - t) * 1000))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
    return seen


async def run(base: str, key: str, body: dict[str, object], args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    watcher = asyncio.create_task(keyed(base, key, body, stop))
    started = time.perf_counter()
    statuses = await flood(base, args.probes, args.connections, args.addresses)
    elapsed = time.perf_counter() - started
    stop.set()
    seen = await watcher
    print(f"flood: {args.probes} probes in {elapsed:.1f} s ({args.probes / elapsed:.0f}/s): {dict(statuses)}")
    codes = collections.Counter(s for s, _ in seen)
    print(f"keyed client: {dict(codes)}, median {statistics.median(ms for _, ms in seen):.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--probes", type=int, default=5000)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--addresses", type=int, default=1, help="flood from this many source addresses")
    parser.add_argument("--port", type=int, default=8391)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bastion-flood-", dir=os.environ.get("BENCH_DIR")))
    build = build_demo(work / "demo", port=args.port)
    config = build.config_path
    key = create_key(config, role="admin")
    server = subprocess.Popen([*BASTION, "serve", "--config", str(config), "--log-level", "warning"])
    base = f"http://127.0.0.1:{args.port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        state = work / "demo" / "state"
        before = audit_size(state)
        asyncio.run(run(base, key, infer_request(build.features[:1]), args))
        time.sleep(0.5)
        during = audit_size(state)
        server.send_signal(2)
        server.wait(timeout=30)
        after = audit_size(state)
        print(
            f"audit while running: +{during[0] - before[0]} records, "
            f"+{(during[1] - before[1]) / 1e6:.2f} MB (main file + WAL)"
        )
        print(f"audit after shutdown: +{after[0] - before[0]} records, {after[1] / 1e6:.2f} MB on disk")
    finally:
        if server.poll() is None:
            server.kill()


if __name__ == "__main__":
    main()
