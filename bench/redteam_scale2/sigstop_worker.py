"""SIGSTOP one of 2 workers (a hung worker: a stuck C extension, a GIL-holding model, swap).
Does the supervisor notice? Do new connections keep being answered? Then SIGKILL the supervisor:
are the workers gone, the port freed, the state lock released?"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import *
from sklearn.datasets import load_breast_cancer

ROW = [float(x) for x in load_breast_cancer().data[0]]
ROOTDIR = Path("/tmp/rt2_sigstop")
import shutil

shutil.rmtree(ROOTDIR, ignore_errors=True)
config, build = deploy(ROOTDIR)
key = create_key(config, "admin")
srv = start_server(config, ROOTDIR / "server.log", "--workers", "2")
H = {"Authorization": f"Bearer {key}"}
body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 30], "data": ROW}]}


def one(path="/v2/models/breast-cancer/infer"):
    try:
        with httpx.Client(timeout=4) as c:  # new connection each time
            r = (
                c.post(srv.base_url + path, json=body, headers=H)
                if "infer" in path
                else c.get(srv.base_url + path)
            )
            return r.status_code
    except Exception as e:
        return type(e).__name__


def burst(n=20, path="/v2/models/breast-cancer/infer"):
    with cf.ThreadPoolExecutor(10) as ex:
        return collections.Counter(ex.map(lambda _: one(path), range(n)))


try:
    time.sleep(4)
    kids = children(srv.process.pid)
    print("workers", kids)
    print("before", burst())
    os.kill(kids[0], signal.SIGSTOP)
    print("SIGSTOP", kids[0])
    for t in range(4):
        print(
            f"t+{t * 10}s infer",
            dict(burst()),
            "live",
            dict(burst(10, "/v2/health/live")),
            "workers",
            children(srv.process.pid),
        )
        time.sleep(6)
    os.kill(kids[0], signal.SIGCONT)
    time.sleep(1)
    # supervisor SIGKILL
    kids = children(srv.process.pid)
    os.kill(srv.process.pid, signal.SIGKILL)
    srv.process.wait()
    time.sleep(3)
    alive = [
        k for k in kids if os.path.exists(f"/proc/{k}") and open(f"/proc/{k}/stat").read().split()[2] != "Z"
    ]
    print("after supervisor SIGKILL: workers alive", alive)
    port = int(srv.base_url.rsplit(":", 1)[1])
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
        print("port free")
    except OSError as e:
        print("port held", e)
    s.close()
    r = (
        subprocess.run(
            [*BASTION, "serve", "--config", str(config), "--port", str(port), "--workers", "2"],
            capture_output=True,
            text=True,
            timeout=8,
        )
        if False
        else None
    )
finally:
    for k in children(srv.process.pid) + kids:
        try:
            os.kill(k, signal.SIGCONT)
            os.kill(k, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        srv.process.kill()
    except Exception:
        pass
    print(open(ROOTDIR / "server.log").read()[-1500:])
