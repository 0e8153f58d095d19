"""Query auditing over HTTP: a thief probing around a few seed rows is flagged, its key quarantined
(every route, its tokens too) with an incident in the audit log; genuine traffic from another key
is untouched; an operator's release lets the key back in."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np

from bastion.demo import infer_request
from tests.conftest import Deployment
from tests.helpers import RunningServer, create_key, run_cli, start_server, write_test_deployment

INFER = "/v2/models/breast-cancer/infer"


def _probe_until_quarantined(server: RunningServer, key: str, x: np.ndarray, seed: int) -> int:
    """Jacobian-style probing (seeds moved by +-1% of a standard deviation) until the key is
    quarantined; the number of requests it took."""
    rng = np.random.default_rng(seed)
    seeds, spread = x[200 + 5 * seed : 205 + 5 * seed], x.std(axis=0)
    with server.client(key) as thief:
        for i in range(100):
            row = seeds[i % len(seeds)] + 0.01 * spread * np.sign(rng.standard_normal(x.shape[1]))
            response = thief.post(INFER, json=infer_request(row[None].astype(np.float32)))
            if response.status_code == 403:
                assert response.json()["code"] == "key_quarantined"
                return i + 1
            assert response.status_code == 200
    raise AssertionError("never quarantined")


def test_a_thief_is_quarantined_and_genuine_clients_are_not(deployment: Deployment) -> None:
    x = deployment.build.features
    thief_key, genuine_key = create_key(deployment.config, "admin"), create_key(deployment.config, "analyst")
    deployment.secrets |= {thief_key, genuine_key}
    thief_id = thief_key.split("_")[1]
    with deployment.server.client(thief_key) as thief:
        token = thief.post("/v2/auth/token", json={"ttl_seconds": 300}).json()["access_token"]
    assert _probe_until_quarantined(deployment.server, thief_key, x, seed=0) <= 40
    with deployment.server.client(thief_key) as thief:
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
    assert again.returncode == 1 and "neither quarantined nor contained" in again.stderr


def test_a_model_flagged_by_several_principals_is_isolated_until_released(tmp_path: Path) -> None:
    """isolate_after = 2: a thief with two keys gets both quarantined, and then the model answers
    nobody (another model of the same server still does) until an operator releases it."""
    config, build = write_test_deployment(tmp_path)
    entry = 'path = "bundles/breast-cancer-1"\ntrusted_keys = ["keys/release.pub"]\n'
    text = config.read_text()
    assert entry in text
    config.write_text(text.replace(entry, entry + "isolate_after = 2\n"))
    first, second, genuine = (create_key(config, role) for role in ("admin", "admin", "analyst"))
    server = start_server(config, tmp_path / "server.log")
    x = build.features
    try:
        assert _probe_until_quarantined(server, first, x, seed=0) <= 40
        with server.client(genuine) as c:
            assert c.post(INFER, json=infer_request(x[:1])).status_code == 200  # one flagged key: served
        assert _probe_until_quarantined(server, second, x, seed=1) <= 40
        with server.client(genuine) as c:
            isolated = c.post(INFER, json=infer_request(x[:1]))
            other = c.post("/v2/models/breast-cancer-skops/infer", json=infer_request(x[:1]))
        assert (isolated.status_code, isolated.json()["code"]) == (503, "model_isolated")
        assert other.status_code == 200
        listed = run_cli("models", "isolated", "--config", config).stdout
        assert "breast-cancer " in listed and "2 principals flagged" in listed
        db = sqlite3.connect(tmp_path / "state" / "audit.db")
        records = [json.loads(b) for (b,) in db.execute("SELECT body FROM records")]
        db.close()
        decisions = [r["decision"] for r in records if r.get("route") == "incident"]
        assert decisions == ["quarantine", "quarantine", "isolate_model"]
        run_cli("models", "release", "breast-cancer", "--config", config)
        with server.client(genuine) as c:
            assert c.post(INFER, json=infer_request(x[:1])).status_code == 200
        again = run_cli("models", "release", "breast-cancer", "--config", config, check=False)
        assert again.returncode == 1 and "not isolated" in again.stderr
    finally:
        server.stop()
