"""A healthy canary rolled back by one client's valid, fast requests that name the canary's version.

The README: requests naming a version are not the rollout's observations, so a client cannot steer the
rollback with them. But they take the canary's thread: routed (unversioned) requests queued behind
them reach their deadline and are answered 504 `inference_timeout`, which counts as the canary's
failure. v1 and v2 are the same healthy model (tests/slow_model.py, work=30000: ~50 ms)."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tests.helpers import BASTION, create_key, start_server, write_test_deployment
from tests.slow_model import slow_manifest, slow_model_bytes, slow_request

from bastion.manifest import write_manifest

WORK = 300000.0  # ~0.45 s on this machine: under the 1 s deadline
EXTRA = """[[models]]
path = "models/slow-1"
unsafe_unsigned = true
inference_timeout_seconds = 1.0
breaker_failures = 10000

[[models]]
path = "models/slow-2"
unsafe_unsigned = true
inference_timeout_seconds = 1.0
breaker_failures = 10000

[rollouts.slow]
stable = "1"
canary = "2"
canary_weight = 0.5
max_error_rate = 0.05
window_seconds = 30
min_requests = 10

[roles.slowpoke]
rate = 200
burst = 200
daily_quota = 1000000
grants = [ { models = ["slow"], actions = ["infer", "metadata"] } ]
"""


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="rt-canary-")) / "d"
    config, _ = write_test_deployment(root, extra=EXTRA)
    for v in ("1", "2"):
        d = root / "models" / f"slow-{v}"
        d.mkdir(parents=True)
        (d / "model.onnx").write_bytes(slow_model_bytes())
        write_manifest(d, slow_manifest("slow").model_copy(update={"version": v}))
    attacker, user = create_key(config, "slowpoke"), create_key(config, "slowpoke")
    server = start_server(config, root.parent / "server.log")
    stop = threading.Event()
    user_results: list[tuple[str, int, str]] = []
    try:

        def benign() -> None:
            with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {user}"}) as c:
                while not stop.is_set():
                    r = c.post(f"{server.base_url}/v2/models/slow/infer", json=slow_request(0.0))
                    user_results.append(
                        (
                            r.headers.get("x-model-version", "?"),
                            r.status_code,
                            r.json().get("code", "") if r.status_code != 200 else "",
                        )
                    )
                    time.sleep(0.1)

        def attack(_: int) -> int:
            with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {attacker}"}) as c:
                return c.post(
                    f"{server.base_url}/v2/models/slow/versions/2/infer", json=slow_request(WORK)
                ).status_code

        bt = threading.Thread(target=benign)
        bt.start()
        time.sleep(3)
        print("benign alone, 3 s:", Counter(user_results))
        user_results.clear()
        with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {attacker}"}) as c:
            t = time.monotonic()
            r = c.post(f"{server.base_url}/v2/models/slow/versions/2/infer", json=slow_request(WORK))
            print(
                f"one attacker request alone: {r.status_code} in {time.monotonic() - t:.2f} s (timeout 1 s)"
            )
        att = Counter()
        t0 = time.monotonic()

        def attacker_loop(i: int) -> None:
            time.sleep(i * 0.04)  # staggered: fresh requests reach the canary's queue all the time
            while time.monotonic() - t0 < 12:
                att[attack(0)] += 1

        with concurrent.futures.ThreadPoolExecutor(24) as pool:
            list(pool.map(attacker_loop, range(24)))
        time.sleep(2)
        stop.set()
        bt.join()
        print("attacker (version 2 named):", att)
        print("benign during attack:", Counter(user_results))
        st = subprocess.run(
            [*BASTION, "rollout", "status", "--config", str(config)], capture_output=True, text=True
        )
        print("rollout status:", st.stdout.strip()[-300:], st.stderr.strip()[-200:])
    finally:
        server.stop()
        out = subprocess.run(
            [*BASTION, "audit", "export", "--config", str(config)], capture_output=True, text=True
        ).stdout
        for ln in out.splitlines():
            rec = json.loads(ln)
            if rec.get("route") in ("rollout", "breaker"):
                print("audit:", {k: rec.get(k) for k in ("route", "decision", "reason", "version", "detail")})


if __name__ == "__main__":
    main()
