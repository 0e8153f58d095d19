"""PostgreSQL frozen mid-run (a relay in front of it stops forwarding bytes but keeps the TCP
connections open: a hung primary, a black-holed network). 2 workers, audit sink postgres via the
relay. Expected: answers stop with 503 audit_unavailable within ~5 s, liveness 200, resume after."""

from __future__ import annotations

import collections
import concurrent.futures as cf
import os
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
import psycopg
from common import *
from sklearn.datasets import load_breast_cancer

ROW = [float(x) for x in load_breast_cancer().data[0]]
TABLE = "rt2_audit_freeze" + (sys.argv[1] if len(sys.argv) > 1 else "2")
frozen = threading.Event()


def pipe(a, b):
    try:
        while True:
            d = a.recv(65536)
            if not d:
                break
            while frozen.is_set():
                time.sleep(0.05)
            b.sendall(d)
    except OSError:
        pass
    finally:
        for s in (a, b):
            try:
                s.close()
            except OSError:
                pass


lsock = socket.socket()
lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
lsock.bind(("127.0.0.1", 0))
lsock.listen(64)
RPORT = lsock.getsockname()[1]


def acceptor():
    while True:
        c, _ = lsock.accept()
        u = socket.create_connection(("127.0.0.1", 5432))
        threading.Thread(target=pipe, args=(c, u), daemon=True).start()
        threading.Thread(target=pipe, args=(u, c), daemon=True).start()


threading.Thread(target=acceptor, daemon=True).start()
with psycopg.connect(PG, autocommit=True) as c:
    for t in (TABLE, TABLE + "_checkpoints", TABLE + "_signer"):
        c.execute(f"DROP TABLE IF EXISTS {t}")
ROOTDIR = Path("/tmp/rt2_pgfreeze")
import shutil

shutil.rmtree(ROOTDIR, ignore_errors=True)
config, build = deploy(ROOTDIR, pg_table=TABLE)
config.write_text(config.read_text().replace("127.0.0.1:5432", f"127.0.0.1:{RPORT}"))
key = create_key(config, "admin")
WORKERS = sys.argv[1] if len(sys.argv) > 1 else "2"
srv = start_server(config, ROOTDIR / "server.log", *(["--workers", WORKERS] if WORKERS != "1" else []))
H = {"Authorization": f"Bearer {key}"}
body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 30], "data": ROW}]}


def one(path="/v2/models/breast-cancer/infer"):
    t = time.monotonic()
    try:
        with httpx.Client(timeout=30) as c:
            r = (
                c.post(srv.base_url + path, json=body, headers=H)
                if "infer" in path
                else c.get(srv.base_url + path)
            )
            s = (
                r.status_code
                if r.status_code == 200
                else f"{r.status_code}:{r.json().get('code', '')}"
                if r.headers.get("content-type", "").startswith("application/json")
                else r.status_code
            )
    except Exception as e:
        s = type(e).__name__
    return s, round(time.monotonic() - t, 1)


def burst(n=16, path="/v2/models/breast-cancer/infer"):
    with cf.ThreadPoolExecutor(16) as ex:
        res = list(ex.map(lambda _: one(path), range(n)))
    return dict(collections.Counter(s for s, _ in res)), "max %.1fs" % max(l for _, l in res)


try:
    time.sleep(4)
    print("before", burst())
    frozen.set()
    print("FROZEN")
    for i in range(3):
        print(" infer", burst(), "live", burst(6, "/v2/health/live"), "ready", burst(4, "/v2/health/ready"))
    frozen.clear()
    print("THAWED")
    time.sleep(3)
    for i in range(3):
        print(" infer", burst(), "ready", burst(4, "/v2/health/ready"))
        time.sleep(2)
finally:
    frozen.clear()
    srv.stop()
    r = run_cli("audit", "verify", "--config", config, check=False)
    print("verify", r.returncode, r.stdout.strip()[:200], r.stderr.strip()[-200:])
    with psycopg.connect(PG, autocommit=True) as c:
        for t in (TABLE, TABLE + "_checkpoints", TABLE + "_signer"):
            c.execute(f"DROP TABLE IF EXISTS {t}")
