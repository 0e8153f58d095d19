"""Drift done-when over HTTP: the bundle's reference rows (shift 0: expect no alert), or the same rows
with one feature shifted by SHIFT reference standard deviations (expect that feature's alert only).
usage: drift_http.py URL BUNDLE_DIR FEATURE SHIFT_SD ROWS_PER_REQUEST KEY_ENV [KEY_ENV...]"""

import os
import sys
import time

import httpx
import numpy as np

url, bundle, feat, shift, per = (
    sys.argv[1],
    sys.argv[2],
    int(sys.argv[3]),
    float(sys.argv[4]),
    int(sys.argv[5]),
)
keys = [os.environ[k] for k in sys.argv[6:]]
ref = np.load(os.path.join(bundle, "reference.npz"))["features"].astype(np.float64)
sd = ref.std(0)
rng = np.random.default_rng(int(time.time()))
codes: dict = {}
sent = 0
with httpx.Client(base_url=url, timeout=30) as c:
    for attempt in range(60):
        if sent >= 600:
            break
        rows = ref[rng.permutation(len(ref))[:per]].copy()
        rows[:, feat] += shift * sd[feat]
        body = {
            "inputs": [
                {"name": "features", "shape": [per, 30], "datatype": "FP32", "data": rows.ravel().tolist()}
            ]
        }
        r = c.post(
            "/v2/models/breast-cancer/infer",
            json=body,
            headers={"Authorization": f"Bearer {keys[attempt % len(keys)]}"},
        )
        code = 200 if r.status_code == 200 else r.json().get("code")
        codes[code] = codes.get(code, 0) + 1
        if r.status_code == 200:
            sent += per
        time.sleep(0.05)
    print("answers:", codes, "rows answered:", sent)
    time.sleep(12)  # one evaluation interval (10 s) and some
    m = c.get("/metrics", headers={"Authorization": f"Bearer {os.environ['ADMIN']}"}).text
    print(
        "active alerts:",
        [x for x in m.splitlines() if x.startswith("bastion_drift_alert{") and x.endswith(" 1.0")],
    )
    print([x for x in m.splitlines() if x.startswith("bastion_drift_psi{") and f'features[{feat}]"' in x])
