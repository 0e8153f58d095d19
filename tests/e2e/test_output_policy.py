"""Output policies over HTTP: each role gets exactly its policy, DP answers are budgeted, exact under
concurrency, and identical questions get the identical answer (no averaging attack)."""

from __future__ import annotations

import asyncio
import json
import sqlite3

import httpx
import numpy as np
import pytest

from bastion.demo import infer_request
from tests.conftest import Deployment
from tests.helpers import create_key

MODEL = "breast-cancer"
CLASSES = ["malignant", "benign"]


def _infer(dep: Deployment, key: str, rows: np.ndarray, **extra: object) -> httpx.Response:
    with dep.server.client(key) as c:
        return c.post(f"/v2/models/{MODEL}/infer", json={**infer_request(rows), **extra})


def _truth(dep: Deployment, rows: np.ndarray) -> np.ndarray:
    x = np.asarray(infer_request(rows)["inputs"][0]["data"], dtype=np.float32).reshape(rows.shape)
    return np.asarray(dep.build.estimator.predict_proba(x))


def _outputs(r: httpx.Response) -> dict[str, dict]:
    assert r.status_code == 200, r.text
    return {o["name"]: o for o in r.json()["outputs"]}


def test_top_k_gives_classes_without_scores(deployment: Deployment) -> None:
    key = create_key(deployment.config, "topk")
    rows = deployment.build.features[:4]
    out = _outputs(_infer(deployment, key, rows))
    assert set(out) == {"label", "top_k"}
    truth = _truth(deployment, rows)
    assert out["top_k"]["shape"] == [4, 2]
    ranked = np.asarray(out["top_k"]["data"]).reshape(4, 2)
    assert [list(r) for r in ranked] == [[CLASSES[i] for i in np.argsort(-t)] for t in truth]
    r = _infer(deployment, key, rows, outputs=[{"name": "probabilities"}])
    assert r.status_code == 403 and r.json()["code"] == "output_not_granted"


def test_rounded_scores(deployment: Deployment) -> None:
    key = create_key(deployment.config, "rounded")
    rows = deployment.build.features[20:26]
    got = np.asarray(_outputs(_infer(deployment, key, rows))["probabilities"]["data"]).reshape(6, 2)
    np.testing.assert_allclose(got, np.round(_truth(deployment, rows), 1), atol=1e-6)
    assert set(np.round(got * 10, 5).ravel()) <= set(range(11))


def test_reverse_sigmoid_keeps_the_label_and_hides_the_scores(deployment: Deployment) -> None:
    key = create_key(deployment.config, "rsig")
    rows = deployment.build.features[:40]
    out = _outputs(_infer(deployment, key, rows))
    got = np.asarray(out["probabilities"]["data"]).reshape(40, 2)
    truth = _truth(deployment, rows)
    assert out["label"]["data"] == [CLASSES[i] for i in truth.argmax(axis=1)]
    assert (got.argmax(axis=1) == truth.argmax(axis=1)).all()
    assert np.abs(got - truth).max() > 0.05  # the scores are not the model's
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)


def test_metadata_describes_each_callers_policy(deployment: Deployment) -> None:
    with deployment.server.client(create_key(deployment.config, "dp")) as c:
        params = c.get(f"/v2/models/{MODEL}").json()["parameters"]
    assert params["output_policy"] == "dp_scores" and params["epsilon_per_row"] == 0.5
    assert params["privacy_budget"] == 5.0 and params["granted_outputs"] == ["label", "probabilities"]


def test_dp_budget_runs_out_and_is_audited(deployment: Deployment) -> None:
    key = create_key(deployment.config, "dp")
    statuses = [_infer(deployment, key, deployment.build.features[i : i + 1]).status_code for i in range(12)]
    assert statuses == [200] * 10 + [429, 429]  # 5.0 / 0.5 = 10 answers
    r = _infer(deployment, key, deployment.build.features[50:51])
    assert r.json()["code"] == "privacy_budget_exhausted" and int(r.headers["retry-after"]) >= 1
    conn = sqlite3.connect(deployment.root / "state" / "audit.db")
    records = [json.loads(b) for (b,) in conn.execute("SELECT body FROM records")]
    conn.close()
    key_id = key.split("_")[1]
    mine = [r for r in records if r.get("principal") == f"key:{key_id}" and r["route"] == "infer"]
    assert sum(r["epsilon_spent"] or 0 for r in mine) == pytest.approx(5.0)
    assert [r["reason"] for r in mine].count("privacy_budget_exhausted") == 3


def test_identical_questions_get_the_identical_answer(deployment: Deployment) -> None:
    """Averaging N noisy answers to one question recovers nothing more than one answer."""
    key = create_key(deployment.config, "dp")
    row = deployment.build.features[100:101]
    answers = [np.asarray(_outputs(_infer(deployment, key, row))["probabilities"]["data"]) for _ in range(30)]
    assert all(np.array_equal(a, answers[0]) for a in answers)
    truth = _truth(deployment, row)[0]
    assert np.abs(np.mean(answers, axis=0) - truth).sum() == pytest.approx(np.abs(answers[0] - truth).sum())
    # ...and the 29 repeats spent nothing: 9 more distinct answers fit in the budget of 10.
    distinct = [
        _infer(deployment, key, deployment.build.features[i : i + 1]).status_code for i in range(200, 210)
    ]
    assert distinct == [200] * 9 + [429]
    # A near-duplicate is a new question, charged normally (and now refused).
    near = row.copy()
    near[0, 0] += 0.01
    assert _infer(deployment, key, near).status_code == 429


def test_budget_is_exact_under_concurrent_requests(deployment: Deployment) -> None:
    key = create_key(deployment.config, "dp")

    async def fire() -> list[int]:
        async with httpx.AsyncClient(
            base_url=deployment.server.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30
        ) as c:
            bodies = [infer_request(deployment.build.features[i : i + 1]) for i in range(300, 340)]
            responses = await asyncio.gather(*(c.post(f"/v2/models/{MODEL}/infer", json=b) for b in bodies))
        return [r.status_code for r in responses]

    statuses = asyncio.run(fire())
    assert statuses.count(200) == 10 and statuses.count(429) == 30


def test_dp_noise_is_real(deployment: Deployment) -> None:
    key = create_key(deployment.config, "dp")
    rows = deployment.build.features[400:410]
    got = np.asarray(_outputs(_infer(deployment, key, rows))["probabilities"]["data"]).reshape(10, 2)
    assert not np.allclose(got, _truth(deployment, rows), atol=1e-3)  # epsilon 0.5: far from the truth
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)


def test_aggregates_are_noisy_budgeted_and_cached(deployment: Deployment) -> None:
    key = create_key(deployment.config, "agg")
    rows = deployment.build.features[:200]
    truth = _truth(deployment, rows)
    with deployment.server.client(key) as c:
        r = c.post(f"/v2/models/{MODEL}/aggregate", json=infer_request(rows))
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["rows"] == 200 and body["epsilon_spent"] == 2.0  # count and sum, epsilon 1 each
        counts = body["statistics"]["count"]
        exact = np.bincount(truth.argmax(axis=1), minlength=2)
        assert abs(counts["malignant"] - exact[0]) < 15 and abs(counts["benign"] - exact[1]) < 15
        assert abs(body["statistics"]["mean"]["benign"] - truth[:, 1].mean()) < 0.1
        assert counts["malignant"] != exact[0] or counts["benign"] != exact[1]  # noise was added
        again = c.post(f"/v2/models/{MODEL}/aggregate", json=infer_request(rows)).json()
        assert again["statistics"] == body["statistics"] and again["epsilon_spent"] == 0.0  # cached, free
        assert c.post(f"/v2/models/{MODEL}/aggregate", json=infer_request(rows[:50])).status_code == 200
        refused = c.post(f"/v2/models/{MODEL}/aggregate", json=infer_request(rows[:60]))
        assert refused.status_code == 429 and refused.json()["code"] == "privacy_budget_exhausted"
        off = c.post("/v2/models/breast-cancer-skops/aggregate", json=infer_request(rows[:5]))
        assert off.status_code == 403 and off.json()["code"] == "aggregates_disabled"
        assert c.post(f"/v2/models/{MODEL}/infer", json=infer_request(rows[:1])).status_code == 403
    with deployment.server.client(deployment.keys["analyst"]) as c:  # no aggregate grant
        assert c.post(f"/v2/models/{MODEL}/aggregate", json=infer_request(rows[:5])).status_code == 403


def test_aggregates_over_the_signed_reference_dataset(deployment: Deployment) -> None:
    key = create_key(deployment.config, "agg")
    truth = _truth(deployment, deployment.build.features)
    with deployment.server.client(key) as c:
        r = c.post(f"/v2/models/{MODEL}/aggregate", json={"reference": True})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["rows"] == len(deployment.build.features) == 569
        exact = np.bincount(truth.argmax(axis=1), minlength=2)
        assert abs(body["statistics"]["count"]["benign"] - exact[1]) < 15
        again = c.post(f"/v2/models/{MODEL}/aggregate", json={"reference": True}).json()
        assert again["statistics"] == body["statistics"] and again["epsilon_spent"] == 0.0
        bad = c.post(f"/v2/models/{MODEL}/aggregate", json={"reference": "yes"})
        assert bad.status_code == 400  # not the reference form, and not a V2 body either
