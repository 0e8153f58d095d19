"""Valid, fast requests open a model's circuit breaker for everyone: time spent waiting for the model's
thread counts as the model's own timeout.

The slow ONNX model of tests/slow_model.py answers `work` = 150000 in ~0.2 s: 5x under the model's
`inference_timeout_seconds = 1` (the README's advice: a timeout above the runtime's time for a
batch). One key sends 40 such requests at once (its rate limit allows it): the tail waits > 1 s for
the single thread, is answered 504, and 5 of those in a row open the breaker: 503 for every caller
for `breaker_open_seconds`. No request was slow, no input was bad, the model never failed.
"""

from __future__ import annotations

import concurrent.futures
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tests.helpers import create_key, start_server, write_test_deployment
from tests.slow_model import slow_request, write_slow_model

MODEL = """[[models]]
path = "models/slow"
unsafe_unsigned = true
inference_timeout_seconds = 1.0
inference_threads = 1
breaker_failures = 5
breaker_window_seconds = 60
breaker_open_seconds = 30

[roles.slowpoke]
rate = 100
burst = 100
grants = [ { models = ["slow"], actions = ["infer", "metadata"] } ]
"""
WORK = 150000.0  # ~0.2 s alone: 5x under the deadline


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="rt-breaker-")) / "d"
    config, _ = write_test_deployment(root, extra=MODEL)
    write_slow_model(root / "models" / "slow")
    attacker, victim = create_key(config, "slowpoke"), create_key(config, "slowpoke")
    server = start_server(config, root.parent / "server.log")
    try:
        url = f"{server.base_url}/v2/models/slow/infer"
        with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {victim}"}) as c:
            t = time.monotonic()
            r = c.post(url, json=slow_request(WORK))
            print(f"one request alone: {r.status_code} in {time.monotonic() - t:.3f} s")

        def one(_: int) -> tuple[int, float]:
            with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {attacker}"}) as c:
                t = time.monotonic()
                return c.post(url, json=slow_request(WORK)).status_code, time.monotonic() - t

        with concurrent.futures.ThreadPoolExecutor(40) as pool:
            results = list(pool.map(one, range(40)))
        print(
            "40 concurrent valid requests:",
            Counter(s for s, _ in results),
            f"slowest {max(t for _, t in results):.2f} s",
        )
        with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {victim}"}) as c:
            r = c.post(url, json=slow_request(0.0))
            print(
                f"victim afterwards (work=0): {r.status_code} {r.text[:100]} Retry-After={r.headers.get('retry-after')}"
            )
            r = c.get(f"{server.base_url}/v2/models/slow/ready")
            print(f"model ready: {r.status_code} {r.text[:80]}")
            print(
                "metrics:",
                [
                    ln
                    for ln in httpx.get(
                        f"{server.base_url}/metrics",
                        headers={"Authorization": f"Bearer {create_key(config, 'admin')}"},
                    ).text.splitlines()
                    if ln.startswith(("bastion_model_breaker_state", "bastion_inference_timeouts_total"))
                ][:4],
            )
    finally:
        server.stop()


if __name__ == "__main__":
    main()
