"""A label-only key reads each feature's declared bounds from the input guard's 422 messages, two
requests a feature, and (for bounds made as the demo makes them: the training range widened by a
quarter of its span each side) recovers the training data's exact minimum and maximum per feature.

Usage: bounds_oracle.py URL KEY [model=breast-cancer] [columns=30]
"""

import json
import os
import re
import sys
from pathlib import Path

import httpx
import numpy as np

URL, KEY = sys.argv[1], sys.argv[2]
MODEL = sys.argv[3] if len(sys.argv) > 3 else "breast-cancer"
COLS = int(sys.argv[4]) if len(sys.argv) > 4 else 30
low, high = [], []
# An in-range row (the demo's request.json first row, or $REQUEST_JSON's).
BASE = json.loads(Path(os.environ.get("REQUEST_JSON", "demo/request.json")).read_text())["inputs"][0]["data"][
    :COLS
]
with httpx.Client(base_url=URL, headers={"Authorization": f"Bearer {KEY}"}) as c:
    for col in range(COLS):
        got = []
        for value in (-1e9, 1e9):
            row = list(BASE)  # an in-range row: only this column is out of range
            row[col] = value
            body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, COLS], "data": row}]}
            msg = c.post(f"/v2/models/{MODEL}/infer", json=body).json().get("error", "")
            m = re.search(rf"column {col} is (?:below its minimum|above its maximum) (\S+)", msg)
            got.append(float(m.group(1)) if m else float("nan"))
        low.append(got[0])
        high.append(got[1])
low_a, high_a = np.array(low), np.array(high)
# Demo bounds: low' = low - s/4 (clipped at 0 for non-negative data), high' = high + s/4.
span = (high_a - low_a) / 1.5
est_min, est_max = low_a + span / 4, high_a - span / 4
try:
    from sklearn.datasets import load_breast_cancer

    x = load_breast_cancer().data.astype(np.float32).astype(np.float64)
    ok = low_a > 0  # bounds not clipped at 0: both unknowns solve
    close_max = np.isclose(est_max, x.max(0), rtol=1e-4, atol=2e-4) & ok
    close_min = np.isclose(est_min, x.min(0), rtol=1e-4, atol=2e-4) & ok
    print(
        f"training maximum recovered exactly (to the bounds' rounding): {int(close_max.sum())} of {int(ok.sum())} columns"
    )
    print(
        f"training minimum recovered exactly (to the bounds' rounding): {int(close_min.sum())} of {int(ok.sum())} columns"
    )
except ImportError:
    pass
print("declared bounds read:", list(zip(low, high, strict=True))[:3], "...")
