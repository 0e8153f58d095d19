"""A model's global privacy budget counts every principal's DP answers (red team of issue #9, F3).

One role sets `global_privacy_budget = 5` on the regressor; another role's `dp_scores` grant on the
same model sets none. Its answers used to spend only its own row: 15 DP answers on the model in a
window whose global budget is 5. Over HTTP, on SQLite and on Redis.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.helpers import (
    REDIS_URL,
    RunningServer,
    create_key,
    drop_redis_keys,
    redis_prefix,
    start_server,
    write_test_deployment,
)

ROLES = """
[roles.global_reg]
rate = 1000
burst = 1000
[[roles.global_reg.grants]]
models = ["diabetes"]
actions = ["infer", "metadata", "aggregate"]
output = "dp_scores"
epsilon = 1.0
privacy_budget = 100.0
global_privacy_budget = 5.0

[roles.no_global_reg]
rate = 1000
burst = 1000
[[roles.no_global_reg.grants]]
models = ["diabetes"]
actions = ["infer", "metadata", "aggregate"]
output = "dp_scores"
epsilon = 1.0
privacy_budget = 100.0
budget_window_seconds = 3600
"""


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RunningServer, dict[str, str], list[float]]]:
    root = tmp_path_factory.mktemp(f"globalbudget-{request.param}")
    config, _ = write_test_deployment(root)
    text = config.read_text()
    prefix = redis_prefix()
    if request.param == "redis":
        state = f'[state]\nbackend = "redis"\nredis_url = "{REDIS_URL}"\nredis_prefix = "{prefix}"\n'
        text = text.replace('[state]\nbackend = "sqlite"\n', state)
        assert state in text
    config.write_text(text + ROLES)
    keys = {role: create_key(config, role) for role in ("global_reg", "no_global_reg")}
    row = json.loads((root / "diabetes-request.json").read_text())["inputs"][0]["data"][:10]
    server = start_server(config, root / "server.log")
    yield server, keys, row
    server.stop()
    if request.param == "redis":
        drop_redis_keys(prefix)


def _ask(server: RunningServer, key: str, row: list[float], i: int, route: str = "infer") -> int:
    data = list(row)
    data[0] = data[0] * (1 + 1e-3 * (i + 1))  # a new question each time: no answer from the cache
    body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 10], "data": data}]}
    with server.client(key) as client:
        return client.post(f"/v2/models/diabetes/{route}", json=body).status_code


def test_a_grant_without_a_global_budget_spends_the_models_global_budget(
    served: tuple[RunningServer, dict[str, str], list[float]],
) -> None:
    server, keys, row = served
    first = [_ask(server, keys["global_reg"], row, i) for i in range(3)]
    assert first == [200, 200, 200]
    # The other role's grant sets no global budget: its answers still count toward the model's 5.
    other = [_ask(server, keys["no_global_reg"], row, 100 + i) for i in range(6)]
    assert other == [200, 200, 429, 429, 429, 429]
    assert _ask(server, keys["global_reg"], row, 200) == 429
    # Aggregates spend the same epsilon row (cost 1 for a regressor): nothing left either.
    assert _ask(server, keys["no_global_reg"], row, 300, "aggregate") == 429
    with server.client(keys["no_global_reg"]) as client:
        params = client.get("/v2/models/diabetes").json()["parameters"]
    assert params["global_privacy_budget_remaining"] == 0.0
