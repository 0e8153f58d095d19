"""Privacy budgets over HTTP, from the caller's side: one account per principal, model and window
(two grants never reset each other), and a global budget shared by every principal for every DP
output (dp_scores, aggregates, private prediction). The same server runs with `[metrics] enabled =
false`: /metrics is not there for anyone."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from bastion.bundle.pack import pack
from bastion.bundle.signing import sign_bundle
from bastion.demo import feature_spec, infer_request, write_skops_model
from bastion.manifest import OutputSpec
from tests.helpers import RunningServer, create_key, start_server, write_test_deployment

PRIVATE = "bc-private"  # the demo's classifier as three teachers, for private prediction
# Copies of the demo's classifier that only the global-budget roles spend on: a model's global budget
# counts every role's DP answers on it (red team #9 F3), so the other roles' spending on the demo's
# models would leave these tests less than their budget.
GLOBAL_DP = "bc-global-dp"
GLOBAL_AGG = "bc-global-agg"

MODELS = f"""
[metrics]
enabled = false

[[models]]
path = "bundles/{PRIVATE}-1"
trusted_keys = ["keys/release.pub"]

[[models]]
path = "bundles/{GLOBAL_DP}-1"
trusted_keys = ["keys/release.pub"]

[[models]]
path = "bundles/{GLOBAL_AGG}-1"
trusted_keys = ["keys/release.pub"]
aggregates = true

"""

ROLES = f"""
# The issue's first case: epsilon 1 a row, 3 a window, on two models with windows of an hour and a day.
[roles.two_windows]
rate = 1000
burst = 1000
[[roles.two_windows.grants]]
models = ["breast-cancer"]
actions = ["infer", "metadata"]
output = "dp_scores"
epsilon = 1.0
privacy_budget = 3.0
budget_window_seconds = 3600
[[roles.two_windows.grants]]
models = ["breast-cancer-skops"]
actions = ["infer", "metadata"]
output = "dp_scores"
epsilon = 1.0
privacy_budget = 3.0
budget_window_seconds = 86400

# The second: every key may spend 10, all keys together 5.
[roles.global_dp]
rate = 1000
burst = 1000
[[roles.global_dp.grants]]
models = ["{GLOBAL_DP}"]
actions = ["infer", "metadata"]
output = "dp_scores"
epsilon = 1.0
privacy_budget = 10.0
global_privacy_budget = 5.0

# Aggregates: two statistics of epsilon 1 an answer (cost 2), 100 a key, 6 for everyone.
[roles.global_agg]
rate = 1000
burst = 1000
[[roles.global_agg.grants]]
models = ["{GLOBAL_AGG}"]
actions = ["aggregate"]
epsilon = 1.0
privacy_budget = 100.0
global_privacy_budget = 6.0

# Private prediction: rho 0.25 a row (sigma 2), 10 a key, 1 for everyone.
[roles.global_pate]
rate = 1000
burst = 1000
[[roles.global_pate.grants]]
models = ["{PRIVATE}"]
actions = ["infer", "metadata"]
output = "private_prediction"
sigma = 2.0
privacy_budget = 10.0
global_privacy_budget = 1.0
"""


@dataclass
class Budgets:
    server: RunningServer
    config: Path
    features: np.ndarray


@pytest.fixture(scope="module")
def budgets(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Budgets]:
    from sklearn.datasets import load_breast_cancer

    root = tmp_path_factory.mktemp("budgets")
    config, build = write_test_deployment(root, extra=MODELS)
    data = load_breast_cancer()
    write_skops_model(
        root / "models" / PRIVATE,
        build.estimator,
        [feature_spec(build.features)],
        OutputSpec(classes=[str(c) for c in data.target_names]),
        PRIVATE,
    )
    bundle = root / "bundles" / f"{PRIVATE}-1"
    pack(root / "models" / PRIVATE, bundle, teachers=3, training_data=(build.features, data.target))
    sign_bundle(bundle, build.signing_key, build.passphrase)
    for name in (GLOBAL_DP, GLOBAL_AGG):
        classes = OutputSpec(classes=[str(c) for c in data.target_names])
        write_skops_model(
            root / "models" / name, build.estimator, [feature_spec(build.features)], classes, name
        )
        pack(root / "models" / name, root / "bundles" / f"{name}-1")
        sign_bundle(root / "bundles" / f"{name}-1", build.signing_key, build.passphrase)
    config.write_text(config.read_text() + ROLES)
    server = start_server(config, root / "server.log")
    yield Budgets(server, config, build.features)
    server.stop()


def _post(b: Budgets, key: str, model: str, row: int, route: str = "infer") -> httpx.Response:
    # A distinct row each time: the keyed answer cache would answer a repeat for free.
    with b.server.client(key) as c:
        return c.post(f"/v2/models/{model}/{route}", json=infer_request(b.features[row : row + 1]))


def _answered(responses: list[httpx.Response]) -> int:
    for r in responses:
        assert r.status_code in (200, 429), r.text
        if r.status_code == 429:
            assert r.json()["code"] == "privacy_budget_exhausted" and int(r.headers["retry-after"]) >= 1
    return sum(r.status_code == 200 for r in responses)


def test_two_grants_with_two_windows_keep_two_accounts(budgets: Budgets) -> None:
    """Interleaved, each model's window no longer resets the other's row: 3 answers each, not 8."""
    key = create_key(budgets.config, "two_windows")
    hour, day = [], []
    for i in range(8):
        hour.append(_post(budgets, key, "breast-cancer", 10 + i))
        day.append(_post(budgets, key, "breast-cancer-skops", 10 + i))
    assert [r.status_code for r in hour] == [200] * 3 + [429] * 5
    assert [r.status_code for r in day] == [200] * 3 + [429] * 5
    assert _answered(hour) == _answered(day) == 3
    with budgets.server.client(key) as c:
        for model, window in (("breast-cancer", 3600), ("breast-cancer-skops", 86400)):
            params = c.get(f"/v2/models/{model}").json()["parameters"]
            assert params["privacy_budget_remaining"] == 0.0 and params["budget_window_seconds"] == window


def test_a_global_budget_on_dp_scores_binds_every_key_together(budgets: Budgets) -> None:
    """Two keys, 10 each, 5 for everyone: 5 answers between them, whoever asks."""
    first, second = create_key(budgets.config, "global_dp"), create_key(budgets.config, "global_dp")
    responses = []
    for i in range(6):
        responses.append(_post(budgets, first, GLOBAL_DP, 100 + i))
        responses.append(_post(budgets, second, GLOBAL_DP, 200 + i))
    assert _answered(responses) == 5
    assert "(global)" in responses[-1].json()["error"]
    with budgets.server.client(second) as c:
        params = c.get(f"/v2/models/{GLOBAL_DP}").json()["parameters"]
    assert params["global_privacy_budget"] == 5.0 and params["global_privacy_budget_remaining"] == 0.0
    # A refused global spend gave the key its share back: it has spent only what it was answered.
    answered_second = sum(r.status_code == 200 for r in responses[1::2])
    assert params["privacy_budget_remaining"] == 10.0 - answered_second


def test_a_global_budget_on_aggregates_binds_every_key_together(budgets: Budgets) -> None:
    first, second = create_key(budgets.config, "global_agg"), create_key(budgets.config, "global_agg")
    responses = []
    for i in range(4):
        for key in (first, second):
            with budgets.server.client(key) as c:
                rows = budgets.features[300 + 10 * i + (key == second) * 5 :][:5]
                responses.append(c.post(f"/v2/models/{GLOBAL_AGG}/aggregate", json=infer_request(rows)))
    assert _answered(responses) == 3  # 3 answers of epsilon 2 fit in 6


def test_a_global_budget_on_private_prediction_binds_every_key_together(budgets: Budgets) -> None:
    first, second = create_key(budgets.config, "global_pate"), create_key(budgets.config, "global_pate")
    responses = []
    for i in range(4):
        responses.append(_post(budgets, first, PRIVATE, 400 + i))
        responses.append(_post(budgets, second, PRIVATE, 450 + i))
    assert _answered(responses) == 4  # rho 0.25 a row, 1 for everyone


def test_disabled_metrics_are_not_served_to_anyone(budgets: Budgets) -> None:
    admin = create_key(budgets.config, "admin")  # holds the admin action on "*"
    with budgets.server.client(admin) as c:
        r = c.get("/metrics")
    assert r.status_code == 404 and r.json()["code"] == "route_not_found"
    assert b"bastion_requests" not in r.content
    with budgets.server.client() as c:
        assert c.get("/metrics").status_code == 401  # after authentication, as for any route
