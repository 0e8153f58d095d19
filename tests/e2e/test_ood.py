"""A model thief's queries over HTTP: uniform random rows inside every bound of the manifest are
refused as out of distribution (422), audited, and told nothing about the reference data."""

from __future__ import annotations

import json
import sqlite3

import numpy as np

from bastion.demo import infer_request
from tests.conftest import Deployment


def test_extraction_queries_are_refused_and_real_rows_served(deployment: Deployment) -> None:
    x = deployment.build.features
    rng = np.random.default_rng(7)
    queries = rng.uniform(x.min(axis=0), x.max(axis=0), size=(50, x.shape[1])).astype(np.float32)
    with deployment.server.client(deployment.keys["admin"]) as c:
        refused = c.post("/v2/models/breast-cancer/infer", json=infer_request(queries))
        served = c.post("/v2/models/breast-cancer/infer", json=infer_request(x[100:150]))
    assert refused.status_code == 422
    body = refused.json()
    assert body["code"] == "out_of_distribution" and body["error"].startswith("row 0 ")
    assert not any(ch.isdigit() for ch in body["error"][len("row 0 ") :])  # no distance, no value
    assert served.status_code == 200
    db = sqlite3.connect(deployment.root / "state" / "audit.db")
    reasons = [json.loads(b)["reason"] for (b,) in db.execute("SELECT body FROM records")]
    db.close()
    assert "out_of_distribution" in reasons
