"""The request path's drift call alone: `DriftWatch.observe` on a one-row demo request with its
prediction, against an empty loop (best of 5 rounds of 200,000 calls).

    nice -n 10 .venv/bin/python bench/drift_observe.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from bastion.config import Action, load_config
from bastion.context import InferRequest, RequestContext
from bastion.demo import build_demo
from bastion.service import Bastion


async def _no_body(limit: int) -> bytes:
    return b""


def main() -> None:
    build = build_demo(Path(tempfile.mkdtemp(prefix="bastion-drift-")) / "demo", llm=False)
    service = Bastion(load_config(build.config_path), config_path=build.config_path)
    ctx = RequestContext(request_id="x", action=Action.INFER, now=0.0, credentials=None, read_body=_no_body)
    ctx.model = service.registry.get("breast-cancer")
    ctx.request = InferRequest(None, {"features": build.features[:1].copy()}, None, {}, 1)
    ctx.prediction = np.array([[0.3, 0.7]])
    calls = 200_000
    for label, observe in (("empty loop", False), ("observe", True)):
        best = float("inf")
        for _ in range(5):
            began = time.perf_counter()
            for _ in range(calls):
                if observe:
                    service.drift.observe(ctx, 200, "ok", 0.001)
            best = min(best, (time.perf_counter() - began) / calls)
        print(f"{label}: {best * 1e6:.2f} us per call")
    service.close()


if __name__ == "__main__":
    main()
