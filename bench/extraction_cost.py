"""What query auditing costs per request: the extraction monitor's `observe` for one row, with
the principal's window of recent rows full, on the demo classifier's data (30 columns).

    .venv/bin/python bench/extraction_cost.py
"""

from __future__ import annotations

import time

import numpy as np
from sklearn.datasets import load_breast_cancer

from bastion.extraction import ExtractionMonitor
from bastion.ood import DistributionScreen


def main() -> None:
    x = load_breast_cancer().data
    monitor = ExtractionMonitor(DistributionScreen(x), x)
    rows = x[np.random.default_rng(0).permutation(len(x))].astype(np.float32)
    stream = np.vstack([rows] * 20)
    measured = [monitor.screen.measure({"x": row[None]}, ["x"]) for row in stream]
    for z, squared in measured[:200]:  # fill the window
        monitor.observe("key:warm", z, squared)
    # The whitening is the input guard's (its out-of-distribution screen measures each row once).
    began = time.perf_counter()
    for i, (z, squared) in enumerate(measured):
        monitor.observe(f"key:{i % 8}", z, squared)
    per = (time.perf_counter() - began) / len(stream) * 1e6
    print(f"observe, one row, window full: {per:.1f} us per request ({len(stream)} requests, 8 principals)")


if __name__ == "__main__":
    main()
