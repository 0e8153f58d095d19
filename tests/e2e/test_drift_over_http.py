"""Issue 12's drift done-when over real HTTP, with query auditing on (red team of issue 12, F1):
several keys send the demo's reference rows with one feature shifted by one standard deviation, 50
rows a request, as bench/redteam_issue12/drift_http.py does; every request is answered, nobody is
quarantined, and the drift alert for that feature alone is raised within one window. Replaying the
reference data first raises none. A thief's off-manifold stream on the same server, among the shifted
clients, is still quarantined."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import numpy as np

from bastion.demo import infer_request
from tests.helpers import RunningServer, create_key, start_server, write_test_deployment

INFER = "/v2/models/breast-cancer/infer"
FEATURE = 3  # mean area: a 1-SD shift puts every row past the reference's 95th-percentile radius
ENTRY = 'path = "bundles/breast-cancer-1"\ntrusted_keys = ["keys/release.pub"]\naggregates = true\n'


def _body(rows: np.ndarray) -> dict[str, object]:
    return {
        "inputs": [
            {"name": "features", "shape": list(rows.shape), "datatype": "FP32", "data": rows.ravel().tolist()}
        ]
    }


def _send(server: RunningServer, keys: list[str], rows: np.ndarray, per: int) -> dict[object, int]:
    """`rows` in requests of `per`, from `keys` in turn: the answers' codes and how many of each."""
    codes: dict[object, int] = {}
    for i, start in enumerate(range(0, len(rows), per)):
        with server.client(keys[i % len(keys)]) as c:
            r = c.post(INFER, json=_body(rows[start : start + per]))
        code = 200 if r.status_code == 200 else r.json().get("code")
        codes[code] = codes.get(code, 0) + 1
    return codes


def _alerts(server: RunningServer, admin: str, *, after: float) -> list[str]:
    """The active drift alerts once an evaluation has run after `after` (the interval is 1 s)."""
    time.sleep(max(0.0, after + 2.5 - time.time()))
    with server.client(admin) as c:
        text = c.get("/metrics").text
    return [
        line
        for line in text.splitlines()
        if line.startswith("bastion_drift_alert{") and line.endswith(" 1.0")
    ]


def test_a_one_sd_shift_over_http_raises_its_drift_alert_and_quarantines_nobody(tmp_path: Path) -> None:
    config, _ = write_test_deployment(tmp_path)
    text = config.read_text()
    assert ENTRY in text
    config.write_text(text.replace(ENTRY, ENTRY + "[models.drift]\ninterval_seconds = 1\n"))
    reference = np.load(tmp_path / "bundles" / "breast-cancer-1" / "reference.npz")["features"].astype(
        np.float64
    )
    keys = [create_key(config, "analyst") for _ in range(5)]
    admin, thief = create_key(config, "admin"), create_key(config, "analyst")
    server = start_server(config, tmp_path / "server.log")
    rng = np.random.default_rng(12)
    try:
        # The reference replayed (600 rows, 50 a request, five keys): served, no alert.
        replay = reference[np.r_[rng.permutation(len(reference)), rng.permutation(len(reference))[:31]]]
        assert _send(server, keys, replay, 50) == {200: 12}
        assert _alerts(server, admin, after=time.time()) == []

        # One feature shifted by one reference standard deviation: every row answered, no quarantine,
        # and that feature's alert alone within one window (500 rows).
        shifted = reference[np.r_[rng.permutation(len(reference)), rng.permutation(len(reference))[:31]]]
        shifted[:, FEATURE] += reference[:, FEATURE].std()
        assert _send(server, keys, shifted, 50) == {200: 12}
        alerts = _alerts(server, admin, after=time.time())
        assert len(alerts) == 1 and f'feature="features[{FEATURE}]"' in alerts[0], alerts

        # A thief among them, one row a request: noise of +-30% of a standard deviation around ten
        # real rows (off the manifold, the signal that flagged the shifted clients before): quarantined.
        seeds = reference[rng.choice(len(reference), 10, replace=False)]
        spread = reference.std(axis=0)
        quarantined_at = None
        with server.client(thief) as c:
            for i in range(100):
                row = seeds[i % 10] + 0.3 * spread * np.sign(rng.standard_normal(reference.shape[1]))
                r = c.post(INFER, json=infer_request(row[None].astype(np.float32)))
                if r.status_code == 403:
                    assert r.json()["code"] == "key_quarantined"
                    quarantined_at = i + 1
                    break
                assert r.status_code in (200, 422)  # 422: past the screen, counted too
        assert quarantined_at is not None and quarantined_at <= 40
        # The shifted clients are still served.
        assert _send(server, keys, shifted[:100], 50) == {200: 2}
    finally:
        server.stop()
    db = sqlite3.connect(tmp_path / "state" / "audit.db")
    records = [json.loads(b) for (b,) in db.execute("SELECT body FROM records")]
    db.close()
    incidents = [r for r in records if r.get("route") == "incident"]
    assert [(r["principal"], r["detail"].split(":")[0]) for r in incidents] == [
        (f"key:{thief.split('_')[1]}", "off_manifold")
    ]
    drift = [r for r in records if r.get("route") == "drift" and r["decision"] == "alert"]
    assert [(r["reason"], r["feature"]) for r in drift] == [("feature", f"features[{FEATURE}]")]
