"""A worker stopped (SIGSTOP: a hung process) while it holds the shared audit write lock (SQLite's
flock / BEGIN IMMEDIATE, or PostgreSQL's advisory lock): do the OTHER workers keep answering?
Usage: sigstop_lock_holder.py sqlite|postgres"""

from __future__ import annotations

import collections
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import *
from sklearn.datasets import load_breast_cancer

ROW = [float(x) for x in load_breast_cancer().data[0]]
MODE = sys.argv[1]
TABLE = "rt2_audit_stop"
ROOTDIR = Path(f"/tmp/rt2_stoplock_{MODE}")
import shutil

shutil.rmtree(ROOTDIR, ignore_errors=True)
if MODE == "postgres":
    import psycopg

    with psycopg.connect(PG, autocommit=True) as c:
        for t in (TABLE, TABLE + "_checkpoints", TABLE + "_signer"):
            c.execute(f"DROP TABLE IF EXISTS {t}")
config, build = deploy(ROOTDIR, pg_table=TABLE if MODE == "postgres" else None)
key = create_key(config, "admin")
srv = start_server(config, ROOTDIR / "server.log", "--workers", "2")
H = {"Authorization": f"Bearer {key}"}
body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 30], "data": ROW}]}
stop = threading.Event()
log = []  # (t_end, status, worker-independent)


def loader():
    with httpx.Client(timeout=6) as c:  # keep-alive: pinned to one worker
        while not stop.is_set():
            t = time.monotonic()
            try:
                s = c.post(srv.base_url + "/v2/models/breast-cancer/infer", json=body, headers=H).status_code
            except Exception as e:
                s = type(e).__name__
                c = httpx.Client(timeout=6)
            log.append((time.monotonic(), s, time.monotonic() - t))


ths = [threading.Thread(target=loader, daemon=True) for _ in range(12)]
try:
    time.sleep(3)
    for t in ths:
        t.start()
    time.sleep(2)
    kids = children(srv.process.pid)
    victim = kids[0]
    for trial in range(4):
        os.kill(victim, signal.SIGSTOP)
        t0 = time.monotonic()
        time.sleep(8)
        window = [x for x in log if t0 + 1 < x[0] < t0 + 8]
        print(
            f"trial {trial}: victim stopped 8s; answers finishing in [1s,8s]:",
            dict(collections.Counter(s for _, s, _ in window)),
            "max latency %.1f" % max([l for _, _, l in window] or [0]),
        )
        os.kill(victim, signal.SIGCONT)
        time.sleep(3)
    stop.set()
    time.sleep(7)
    print("overall", dict(collections.Counter(s for _, s, _ in log)))
finally:
    try:
        os.kill(victim, signal.SIGCONT)
    except Exception:
        pass
    srv.stop()
    r = run_cli("audit", "verify", "--config", config, check=False)
    print("verify", r.returncode, r.stdout.strip()[:200], r.stderr.strip()[-200:])
    if MODE == "postgres":
        with psycopg.connect(PG) as c:
            print(
                "200 records",
                c.execute(f"SELECT count(*) FROM {TABLE} WHERE body::jsonb->>'status' = '200'").fetchone(),
            )
