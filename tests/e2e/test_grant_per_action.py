"""A grant of one action never raises what another action returns, over real HTTP: a key with a
metadata grant of probabilities and an infer grant of labels is answered labels, and its metadata
says so."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import Deployment
from tests.e2e.test_http import infer_body
from tests.helpers import RunningServer, create_key, start_server, write_test_deployment

MODEL = "breast-cancer"
ROLES = f"""
[roles.split]
rate = 1000
burst = 1000
grants = [
  {{ models = ["{MODEL}"], actions = ["metadata"], output = "probabilities", sensitive_inputs = true }},
  {{ models = ["{MODEL}"], actions = ["infer"], output = "label" }},
  {{ models = ["*"], actions = ["metadata"], output = "probabilities" }},
]

[roles.meta_only]
rate = 1000
burst = 1000
grants = [ {{ models = ["{MODEL}"], actions = ["metadata", "aggregate"], output = "probabilities" }} ]
"""


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Deployment, dict[str, str]]]:
    root = tmp_path_factory.mktemp("per-action")
    config, build = write_test_deployment(root, extra=ROLES)
    keys = {role: create_key(config, role) for role in ("split", "meta_only")}
    server: RunningServer = start_server(config, root / "server.log")
    try:
        yield Deployment(server, config, root, build, keys, secrets=set(keys.values())), keys
    finally:
        server.stop()


def test_a_metadata_grant_of_probabilities_does_not_raise_infer(
    split: tuple[Deployment, dict[str, str]],
) -> None:
    dep, keys = split
    with dep.server.client(keys["split"]) as c:
        answer = c.post(f"/v2/models/{MODEL}/infer", json=infer_body(dep))
        asked = c.post(
            f"/v2/models/{MODEL}/infer", json={**infer_body(dep), "outputs": [{"name": "probabilities"}]}
        )
        meta = c.get(f"/v2/models/{MODEL}")
    assert answer.status_code == 200, answer.text
    assert [o["name"] for o in answer.json()["outputs"]] == ["label"]
    assert asked.status_code == 403 and asked.json()["code"] == "output_not_granted", asked.text
    params = meta.json()["parameters"]
    assert [o["name"] for o in meta.json()["outputs"]] == ["label"]
    assert params["granted_outputs"] == ["label"] and params["output_policy"] == "label"
    assert params["granted_actions"] == ["infer", "metadata"]
    assert params["sensitive_inputs_granted"] is False  # set on the metadata grant only


def test_metadata_without_infer_lists_no_outputs(split: tuple[Deployment, dict[str, str]]) -> None:
    dep, keys = split
    with dep.server.client(keys["meta_only"]) as c:
        meta = c.get(f"/v2/models/{MODEL}")
        answer = c.post(f"/v2/models/{MODEL}/infer", json=infer_body(dep))
        token = c.post("/v2/auth/token", json={"scope": [f"metadata:{MODEL}"], "output": "probabilities"})
    assert meta.status_code == 200, meta.text
    assert meta.json()["outputs"] == [] and meta.json()["parameters"]["granted_outputs"] == []
    assert meta.json()["parameters"]["output_policy"] is None
    assert answer.status_code == 403, answer.text
    # The output claim caps infer answers: a key with no infer grant gets no output claim either.
    assert token.status_code == 403 and token.json()["code"] == "output_not_granted", token.text
