"""Query auditing over HTTP: a thief probing around a few seed rows is flagged, its key quarantined
(every route, its tokens too) with an incident in the audit log; genuine traffic from another key
is untouched; an operator's release lets the key back in."""

from __future__ import annotations

import json
import sqlite3

import numpy as np

from bastion.demo import infer_request
from tests.conftest import Deployment
from tests.helpers import create_key, run_cli

INFER = "/v2/models/breast-cancer/infer"


def test_a_thief_is_quarantined_and_genuine_clients_are_not(deployment: Deployment) -> None:
    x = deployment.build.features
    thief_key, genuine_key = create_key(deployment.config, "admin"), create_key(deployment.config, "analyst")
    deployment.secrets |= {thief_key, genuine_key}
    thief_id = thief_key.split("_")[1]
    rng = np.random.default_rng(11)
    seeds, spread = x[200:205], x.std(axis=0)
    statuses: list[int] = []
    with deployment.server.client(thief_key) as thief:
        token = thief.post("/v2/auth/token", json={"ttl_seconds": 300}).json()["access_token"]
        for i in range(100):  # Jacobian-style probing: seeds moved by +-1% of a standard deviation
            row = seeds[i % len(seeds)] + 0.01 * spread * np.sign(rng.standard_normal(x.shape[1]))
            response = thief.post(INFER, json=infer_request(row[None].astype(np.float32)))
            statuses.append(response.status_code)
            if response.status_code == 403:
                assert response.json()["code"] == "key_quarantined"
                break
        assert statuses[-1] == 403 and set(statuses[:-1]) == {200}
        assert len(statuses) <= 40, f"flagged only after {len(statuses)} queries"
        # Contained everywhere: inference with a real row, metadata, a new token.
        for method, path, body in [
            ("POST", INFER, infer_request(x[:1])),
            ("GET", "/v2/models/breast-cancer", None),
            ("POST", "/v2/auth/token", {"ttl_seconds": 60}),
        ]:
            refused = thief.request(method, path, json=body)
            assert (refused.status_code, refused.json()["code"]) == (403, "key_quarantined"), path
    with deployment.server.client(token) as by_token:
        assert by_token.post(INFER, json=infer_request(x[:1])).status_code == 403

    with deployment.server.client(genuine_key) as genuine:
        for i in range(60):
            assert genuine.post(INFER, json=infer_request(x[300 + i : 301 + i])).status_code == 200

    listed = run_cli("keys", "list", "--config", deployment.config).stdout
    assert any(thief_id in line and "quarantined" in line for line in listed.splitlines())
    db = sqlite3.connect(deployment.root / "state" / "audit.db")
    records = [json.loads(b) for (b,) in db.execute("SELECT body FROM records")]
    db.close()
    (incident,) = [r for r in records if r.get("route") == "incident" and r["principal"] == f"key:{thief_id}"]
    assert incident["decision"] == "quarantine" and incident["reason"] == "extraction_suspected"
    assert incident["model"] == "breast-cancer" and incident["digest"].startswith("sha256:")
    assert "near_duplicates" in incident["detail"]
    assert len(incident["payload_hmac"]) == 64  # lineage to the request that tipped it, never the row
    with deployment.server.client(deployment.keys["admin"]) as admin:
        metrics = admin.get("/metrics").text
    assert (
        'bastion_incidents_total{action="quarantine",model="breast-cancer",signal="near_duplicates"}'
        in metrics
    )

    released = run_cli("keys", "release", thief_id, "--config", deployment.config)
    assert thief_id in released.stdout
    with deployment.server.client(thief_key) as thief:
        assert thief.post(INFER, json=infer_request(x[400:401])).status_code == 200
    again = run_cli("keys", "release", thief_id, "--config", deployment.config, check=False)
    assert again.returncode == 1 and "not quarantined" in again.stderr
