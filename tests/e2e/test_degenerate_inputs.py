"""Degenerate tensors over real HTTP, against every served model, on the infer and aggregate routes:
each is a 4xx with a stable code (never a 500), refused before the screen, the runtime or any
budget (the caller's privacy budget, as its model metadata shows it, does not move)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest
from sklearn.datasets import load_diabetes

from tests.helpers import RunningServer, create_key, start_server, write_test_deployment

MODELS = ("breast-cancer", "breast-cancer-skops", "diabetes", "loan")
ROUTES = ("infer", "aggregate")

# dp_scores on every model, so that each one shows a privacy budget that a spend would move.
ROLE = """
[roles.degen]
rate = 100000
burst = 100000
daily_quota = 100000000
[[roles.degen.grants]]
models = ["breast-cancer", "breast-cancer-skops", "diabetes", "loan"]
actions = ["infer", "metadata", "aggregate"]
output = "dp_scores"
epsilon = 0.5
privacy_budget = 1000.0
sensitive_inputs = true

"""

Spec = dict[str, Any]  # one entry of the model metadata's "inputs"


def _valid(spec: Spec, rows: int = 1) -> dict[str, Any]:
    columns = spec["shape"][-1]
    return {
        "name": spec["name"],
        "datatype": spec["datatype"],
        "shape": [rows, columns],
        "data": [0] * rows * columns,
    }


def _first(first: dict[str, Any]) -> Callable[[list[Spec]], list[dict[str, Any]]]:
    """The first input replaced by `first` (its name and datatype filled in), the others valid."""

    def build(specs: list[Spec]) -> list[dict[str, Any]]:
        head = {"name": specs[0]["name"], "datatype": specs[0]["datatype"], **first}
        return [head, *(_valid(s) for s in specs[1:])]

    return build


def _columns(specs: list[Spec]) -> int:
    return int(specs[0]["shape"][-1])


CASES: dict[str, tuple[Callable[[list[Spec]], list[dict[str, Any]]], int, str]] = {
    # the instance: every input with zero rows
    "zero_rows": (
        lambda specs: [{**_valid(s), "shape": [0, s["shape"][-1]], "data": []} for s in specs],
        422,
        "empty_tensor",
    ),
    "row_without_columns": (_first({"shape": [1, 0], "data": []}), 422, "empty_tensor"),
    "zero_by_zero": (_first({"shape": [0, 0], "data": []}), 422, "empty_tensor"),
    "zero_and_overflowing": (_first({"shape": [0, 2**62, 2**62], "data": []}), 422, "empty_tensor"),
    "bytes_zero_rows": (_first({"datatype": "BYTES", "shape": [0], "data": []}), 422, "empty_tensor"),
    "overflowing_product": (_first({"shape": [2**40, 2**40], "data": [0.0]}), 422, "shape_mismatch"),
    "product_not_data_length": (
        lambda specs: _first({"shape": [2, _columns(specs)], "data": [0.0] * _columns(specs)})(specs),
        422,
        "shape_mismatch",
    ),
    "one_dimensional": (
        lambda specs: _first({"shape": [_columns(specs)], "data": [0.0] * _columns(specs)})(specs),
        422,
        "wrong_shape",
    ),
    "scalar": (_first({"shape": [], "data": 0.0}), 400, "malformed_request"),
    "negative_dimension": (
        lambda specs: _first({"shape": [-1, _columns(specs)], "data": [0.0] * _columns(specs)})(specs),
        400,
        "malformed_request",
    ),
    # two rows in one input, one in another (for a one-input model, a second input of one row)
    "row_counts_differ": (
        lambda specs: (
            [_valid(specs[0], 2), *(_valid(s) for s in specs[1:])]
            + ([{**_valid(specs[0]), "name": "other"}] if len(specs) == 1 else [])
        ),
        422,
        "wrong_shape",
    ),
}


@dataclass
class Served:
    server: RunningServer
    key: str
    specs: dict[str, list[Spec]]
    rows: dict[str, np.ndarray]  # one genuine row of each model's first input


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("degenerate")
    config, build = write_test_deployment(root, extra=ROLE)
    # Aggregates on every model, so that each aggregate case reaches the decoder (a model without them
    # refuses the route before reading the body: 403 aggregates_disabled, tested elsewhere).
    text = re.sub(r"(?m)^aggregates = true.*\n", "", config.read_text())
    config.write_text(re.sub(r'(?m)^(path = "bundles/[^"]+".*\n)', r"\1aggregates = true\n", text))
    key = create_key(config, "degen")
    server = start_server(config, root / "server.log")
    try:
        with server.client(key) as c:
            specs = {m: c.get(f"/v2/models/{m}").json()["inputs"] for m in MODELS}
        cancer = build.features[:1]
        rows = {"breast-cancer": cancer, "breast-cancer-skops": cancer, "diabetes": load_diabetes().data[:1]}
        yield Served(server, key, specs, {**rows, "loan": np.zeros((1, 3))})
    finally:
        server.stop()
    assert "Traceback" not in (root / "server.log").read_text()


def _budget(c: httpx.Client, model: str) -> float:
    return float(c.get(f"/v2/models/{model}").json()["parameters"]["privacy_budget_remaining"])


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("model", MODELS)
def test_degenerate_tensor_is_refused_before_any_spend(
    served: Served, model: str, route: str, case: str
) -> None:
    build, status, code = CASES[case]
    with served.server.client(served.key) as c:
        before = _budget(c, model)
        r = c.post(f"/v2/models/{model}/{route}", json={"inputs": build(served.specs[model])})
        assert r.status_code == status, r.text
        assert r.headers["content-type"].startswith("application/json")
        assert set(r.json()) == {"error", "code"} and r.json()["code"] == code
        assert _budget(c, model) == before


@pytest.mark.parametrize("model", MODELS)
def test_a_valid_row_spends_the_budget_the_other_tests_watch(served: Served, model: str) -> None:
    """The control: the same measure moves when an answer is given, so 'unchanged' above means something."""
    with served.server.client(served.key) as c:
        before = _budget(c, model)
        first, *others = served.specs[model]
        row = [round(float(v), 6) for v in served.rows[model].ravel()]
        body = {"inputs": [{**_valid(first), "data": row}, *(_valid(s) for s in others)]}
        r = c.post(f"/v2/models/{model}/infer", json=body)
        assert r.status_code == 200, r.text
        assert _budget(c, model) == pytest.approx(before - 0.5)
