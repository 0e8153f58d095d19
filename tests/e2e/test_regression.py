"""A regressor over HTTP: one value per row, its own output policies, and DP noise calibrated to
the range its manifest declares (clamped to it, budgeted, cached against averaging)."""

from __future__ import annotations

import functools
from typing import Any

import httpx
import numpy as np
import pytest

from bastion.demo import REGRESSION_MODEL, REGRESSION_RANGE, infer_request, train_regressor
from tests.conftest import Deployment
from tests.helpers import create_key

LOW, HIGH = REGRESSION_RANGE


@functools.cache
def _regressor() -> tuple[Any, np.ndarray]:
    return train_regressor()  # deterministic: the same model the demo packed


def _rows(start: int, n: int) -> np.ndarray:
    return _regressor()[1][start : start + n]


def _truth(rows: np.ndarray) -> np.ndarray:
    # What the server sees: the request's JSON-rounded FP32 values.
    x = np.asarray(infer_request(rows)["inputs"][0]["data"], dtype=np.float32).reshape(rows.shape)
    return np.asarray(_regressor()[0].predict(x), dtype=np.float64)


def _post(dep: Deployment, key: str, route: str, rows: np.ndarray) -> httpx.Response:
    with dep.server.client(key) as c:
        return c.post(f"/v2/models/{REGRESSION_MODEL}/{route}", json=infer_request(rows))


def _values(r: httpx.Response) -> np.ndarray:
    assert r.status_code == 200, r.text
    (out,) = r.json()["outputs"]
    assert out["name"] == "value" and out["datatype"] == "FP64" and out["shape"] == [len(out["data"])]
    return np.asarray(out["data"])


def test_full_and_rounded_values_are_the_models_predictions(deployment: Deployment) -> None:
    rows = _rows(0, 5)
    full = _values(_post(deployment, deployment.keys["admin"], "infer", rows))
    np.testing.assert_allclose(full, _truth(rows), rtol=1e-6)
    rounded = _values(_post(deployment, create_key(deployment.config, "rounded"), "infer", rows))
    np.testing.assert_allclose(rounded, np.round(_truth(rows), 1), atol=1e-9)


def test_a_policy_made_for_classes_is_refused_not_guessed(deployment: Deployment) -> None:
    key = create_key(deployment.config, "labels")  # output = "label" on every model, by "*"
    r = _post(deployment, key, "infer", _rows(0, 2))
    assert r.status_code == 403 and r.json()["code"] == "policy_not_applicable"
    assert "rounded, dp_scores or probabilities" in r.json()["error"]
    with deployment.server.client(key) as c:
        meta = c.get(f"/v2/models/{REGRESSION_MODEL}").json()
    assert meta["parameters"]["granted_outputs"] == []
    assert meta["parameters"]["value_range"] == [LOW, HIGH]


def test_dp_values_are_clamped_noisy_budgeted_and_cached(deployment: Deployment) -> None:
    key = create_key(deployment.config, "regdp")  # epsilon 2 a row, 6 in all: three rows
    rows = _rows(10, 2)
    first = _values(_post(deployment, key, "infer", rows))
    assert ((first >= LOW) & (first <= HIGH)).all()
    assert not np.allclose(first, _truth(rows))  # noise of scale 200 on a range of 400
    # Averaging attack: the identical question gets the identical answer, and costs nothing.
    for _ in range(5):
        np.testing.assert_array_equal(_values(_post(deployment, key, "infer", rows)), first)
    with deployment.server.client(key) as c:
        meta = c.get(f"/v2/models/{REGRESSION_MODEL}").json()["parameters"]
    assert meta["output_policy"] == "dp_scores" and meta["privacy_budget_remaining"] == 2.0
    assert _values(_post(deployment, key, "infer", _rows(20, 1))).shape == (1,)
    refused = _post(deployment, key, "infer", _rows(30, 1))
    assert refused.status_code == 429 and refused.json()["code"] == "privacy_budget_exhausted"


def test_dp_aggregate_mean_over_a_batch_is_close_and_charged_once(deployment: Deployment) -> None:
    key = create_key(deployment.config, "regdp")
    rows = _rows(0, 250)
    r = _post(deployment, key, "aggregate", rows)
    assert r.status_code == 200, r.text
    body = r.json()
    truth = np.clip(_truth(rows), LOW, HIGH)
    # The sum (sensitivity 400 on a range of 400) gets Laplace noise of scale 200 at epsilon 2:
    # over 250 rows the mean moves by 0.8 on average; 10 is twelve scales away.
    assert body["epsilon_spent"] == 2.0 and body["rows"] == 250
    assert abs(body["statistics"]["mean"] - truth.mean()) < 10
    assert body["statistics"]["sum"] == pytest.approx(body["statistics"]["mean"] * 250)
    assert set(body["statistics"]) == {"sum", "mean"}
