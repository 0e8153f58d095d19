"""Report: "--workers 2 with audit.sink = postgres made some requests hang". 2 workers, PG sink,
64 concurrent requests x N rounds, each on a new connection; count 200s, timeouts, errors; then
compare with audit records in PG and run `bastion audit verify`."""

from __future__ import annotations

import asyncio
import collections
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import psycopg
from common import *
from sklearn.datasets import load_breast_cancer

ROW = [float(x) for x in load_breast_cancer().data[0]]
KILL = "--kill" in sys.argv

TABLE = "rt2_audit_hang"
ROOTDIR = Path("/tmp/rt2_pg_hang")


def drop():
    with psycopg.connect(PG, autocommit=True) as c:
        for t in (TABLE, TABLE + "_checkpoints", TABLE + "_signer"):
            c.execute(f"DROP TABLE IF EXISTS {t}")


async def main():
    import shutil

    shutil.rmtree(ROOTDIR, ignore_errors=True)
    drop()
    config, build = deploy(ROOTDIR, pg_table=TABLE)
    key = create_key(config, "admin")
    srv = start_server(config, ROOTDIR / "server.log", "--workers", "2")
    try:
        time.sleep(3)
        meta = httpx.get(
            f"{srv.base_url}/v2/models/breast-cancer", headers={"Authorization": f"Bearer {key}"}
        ).json()
        name = meta["inputs"][0]["name"]
        body = {"inputs": [{"name": name, "datatype": "FP32", "shape": [1, 30], "data": ROW}]}
        stats = collections.Counter()
        lat = []

        async def one():
            t = time.monotonic()
            try:
                async with httpx.AsyncClient(timeout=15) as c:
                    r = await c.post(
                        f"{srv.base_url}/v2/models/breast-cancer/infer",
                        json=body,
                        headers={"Authorization": f"Bearer {key}"},
                    )
                stats[r.status_code] += 1
                if r.status_code != 200:
                    stats[r.text[:80]] += 1
            except Exception as e:
                stats[type(e).__name__] += 1
            lat.append(time.monotonic() - t)

        for rnd in range(int(sys.argv[1]) if len(sys.argv) > 1 else 5):
            if KILL and rnd == 2:

                async def killer():
                    await asyncio.sleep(0.3)
                    kids = children(srv.process.pid)
                    print("SIGKILL worker", kids[0], "of", kids)
                    os.kill(kids[0], signal.SIGKILL)

                await asyncio.gather(killer(), *(one() for _ in range(64)))
            else:
                await asyncio.gather(*(one() for _ in range(64)))
        print("workers after", children(srv.process.pid))
        lat.sort()
        print(
            "results",
            dict(stats),
            "p50 %.3f p99 %.3f max %.3f" % (lat[len(lat) // 2], lat[int(len(lat) * 0.99)], lat[-1]),
        )
        with psycopg.connect(PG) as c:
            n = (
                c.execute(
                    f"SELECT count(*) FROM {TABLE} WHERE record::text LIKE '%%breast-cancer%%' AND record::text LIKE '%%infer%%'"
                ).fetchone()
                if False
                else None
            )
            cols = c.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name=%s", (TABLE,)
            ).fetchall()
            print("cols", cols)
            print(
                "200 records",
                c.execute(
                    f"SELECT count(*) FROM {TABLE} WHERE body::jsonb->>'status' = '200' AND body LIKE '%%infer%%'"
                ).fetchone(),
            )
            print(c.execute(f"SELECT body FROM {TABLE} ORDER BY seq DESC LIMIT 1").fetchone())
            print("rows", c.execute(f"SELECT count(*) FROM {TABLE}").fetchone())
    finally:
        srv.stop()
    r = run_cli("audit", "verify", "--config", config, check=False)
    print("verify", r.returncode, r.stdout.strip(), r.stderr.strip()[-300:])


asyncio.run(main())
