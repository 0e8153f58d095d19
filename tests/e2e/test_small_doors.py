"""Smaller doors, from the caller's side over HTTP: a token only narrows its key, and a model's
metadata lists exactly what the same caller's answers carry."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import httpx
import pytest

from bastion.keys import KeyStore
from tests.conftest import Deployment
from tests.e2e.test_http import infer_body
from tests.helpers import create_key, run_cli, start_server, write_test_deployment

ONNX = "breast-cancer"
REGRESSOR = "diabetes"


def _key(dep: Deployment, role: str) -> str:
    """A key for a role of the test policy, written to the server's key file (read on each request)."""
    store = KeyStore(dep.root / "state" / "keys.db")
    key = store.create(name=f"doors-{role}", roles=[role], now=0.0).secret
    store.close()
    dep.secrets.add(key)
    return key


def _token(dep: Deployment, key: str, body: Any) -> httpx.Response:
    with dep.server.client(key) as c:
        return c.post("/v2/auth/token", json=body)


def _code(r: httpx.Response) -> tuple[int, str]:
    return r.status_code, r.json().get("code", "")


@pytest.mark.parametrize(
    ("role", "body"),
    [
        ("analyst", {"scope": [f"infer:{ONNX}"], "output": "probabilities"}),
        ("analyst", {"scope": [f"infer:{ONNX}"], "output": "full"}),  # probabilities by another name
        ("topk", {"scope": ["infer:*"], "output": "probabilities"}),  # a wildcard: top_k is its most
        ("analyst", {"scope": [f"infer:{ONNX}"], "output": "top_k"}),
        ("analyst", {"scope": [f"metadata:{ONNX}"], "output": "rounded"}),
        ("topk", {"scope": [f"infer:{ONNX}"], "output": "dp_scores"}),
        ("topk", {"scope": [f"infer:{ONNX}", "metadata:*"], "output": "reverse_sigmoid"}),
        # Below the grant's output but needing parameters the grant never set (sigma, k, epsilon, beta,
        # decimals): the token would be served with config defaults.
        ("analyst", {"scope": [f"infer:{ONNX}"], "output": "private_prediction"}),
        ("analyst", {"scope": [f"metadata:{ONNX}"], "output": "private_prediction"}),
        ("analyst", {"scope": ["infer:*"], "output": "private_prediction"}),  # no grant anywhere serves it
        ("analyst", {"scope": ["infer:*"], "output": "top_k"}),  # loan's probabilities set no k
        ("analyst", {"scope": ["infer:loan"], "output": "dp_scores"}),
        ("analyst", {"scope": ["infer:loan"], "output": "reverse_sigmoid"}),
        ("analyst", {"scope": ["infer:loan"], "output": "rounded"}),
        ("admin", {"scope": [f"infer:{ONNX}", f"metadata:{ONNX}"], "output": "top_k"}),
        ("rounded", {"scope": [f"infer:{ONNX}"], "output": "top_k"}),
        ("dp", {"scope": [f"infer:{ONNX}"], "output": "private_prediction"}),
        ("topk", {"scope": [f"infer:{ONNX}"], "output": "private_prediction"}),
        ("rounded", {"scope": [f"infer:{REGRESSOR}"], "output": "label"}),  # a regressor has no label
    ],
)
def test_a_token_cannot_ask_for_more_output_than_its_key(
    deployment: Deployment, role: str, body: Any
) -> None:
    r = _token(deployment, _key(deployment, role), body)
    assert _code(r) == (403, "output_not_granted"), r.text
    assert "access_token" not in r.text


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"scope": [f"infer:{ONNX}"], "ttl_seconds": 86_400}, (403, "ttl_not_granted")),  # over the 900 s cap
        ({"scope": [f"infer:{ONNX}"], "ttl_seconds": 10**5}, (400, "malformed_request")),  # over any cap
        ({"scope": [f"infer:{ONNX}"], "ttl_seconds": 901}, (403, "ttl_not_granted")),
        ({"scope": [f"infer:{ONNX}"], "ttl_seconds": 0}, (400, "malformed_request")),
        ({"scope": [f"infer:{ONNX}"], "ttl_seconds": "60"}, (400, "malformed_request")),
        ({"scope": [f"infer:{ONNX}"], "ttl_seconds": True}, (400, "malformed_request")),
        ({"scope": [f"infer:{ONNX}"], "output": ["label"]}, (400, "malformed_request")),
        ({"scope": [f"infer:{ONNX}"], "output": {"label": 1}}, (400, "malformed_request")),
        ({"scope": [f"infer:{ONNX}"], "output": "everything"}, (400, "malformed_request")),
        ({"scope": [f"infer:{ONNX}"], "sensitive_inputs": True}, (400, "malformed_request")),  # not a claim
        ({"scope": [f"infer:{ONNX}"], "aud": "elsewhere"}, (400, "malformed_request")),
        ({"scope": f"infer:{ONNX}"}, (400, "malformed_request")),
        ({"scope": [f"admin:{ONNX}"]}, (403, "scope_not_granted")),
        ({"scope": [f"infer:{REGRESSOR}"]}, (403, "scope_not_granted")),
    ],
)
def test_every_token_claim_narrows_or_is_refused(
    deployment: Deployment, body: Any, expected: tuple[int, str]
) -> None:
    r = _token(deployment, deployment.keys["analyst"], body)
    assert _code(r) == expected, r.text


def test_a_narrower_output_is_issued_and_served(deployment: Deployment) -> None:
    r = _token(deployment, _key(deployment, "topk"), {"scope": [f"infer:{ONNX}"], "output": "label"})
    assert r.status_code == 200, r.text
    token = r.json()["access_token"]
    deployment.secrets.add(token)
    with deployment.server.client(token) as c:
        answer = c.post(f"/v2/models/{ONNX}/infer", json=infer_body(deployment))
    assert answer.status_code == 200 and [o["name"] for o in answer.json()["outputs"]] == ["label"]


@pytest.mark.parametrize(
    ("role", "model"),
    [
        ("analyst", ONNX),  # label
        ("topk", ONNX),  # label and top_k
        ("dp", ONNX),  # dp_scores
        ("rounded", ONNX),
        ("rsig", ONNX),
        ("admin", ONNX),  # probabilities
        ("rounded", REGRESSOR),  # a value
        ("labels", REGRESSOR),  # a policy made for classes: nothing is served, nothing is listed
    ],
)
def test_metadata_lists_exactly_the_outputs_the_same_caller_is_served(
    deployment: Deployment, role: str, model: str
) -> None:
    key = deployment.keys.get(role) or _key(deployment, role)
    body = infer_body(deployment) if model == ONNX else _regression_body(deployment)
    with deployment.server.client(key) as c:
        meta = c.get(f"/v2/models/{model}")
        answer = c.post(f"/v2/models/{model}/infer", json=body)
    assert meta.status_code == 200, meta.text
    listed = [o["name"] for o in meta.json()["outputs"]]
    served = [o["name"] for o in answer.json()["outputs"]] if answer.status_code == 200 else []
    assert answer.status_code in (200, 403), answer.text
    assert listed == served, f"{role} on {model}: metadata lists {listed}, the answer carries {served}"
    assert meta.json()["parameters"]["granted_outputs"] == served
    assert "infer" in meta.json()["parameters"]["granted_actions"]


@pytest.mark.parametrize(
    ("role", "body"),
    [
        ("admin", {"scope": [f"infer:{ONNX}", f"metadata:{ONNX}"], "output": "label"}),  # probabilities
        ("admin", {"scope": ["infer:*", "metadata:*"], "output": "probabilities"}),  # its own output
        ("topk", {"scope": [f"infer:{ONNX}", f"metadata:{ONNX}"], "output": "label"}),
        ("topk", {"scope": [f"infer:{ONNX}", f"metadata:{ONNX}"], "output": "top_k"}),
        ("dp", {"scope": [f"infer:{ONNX}", f"metadata:{ONNX}"], "output": "label"}),
        ("rsig", {"scope": ["infer:*", "metadata:*"], "output": "label"}),
        ("rounded", {"scope": [f"infer:{ONNX}", f"metadata:{ONNX}"], "output": "label"}),
        ("analyst", {"scope": ["infer:*", f"metadata:{ONNX}"], "output": "label"}),
    ],
)
def test_metadata_through_a_narrowing_token_describes_what_the_token_gets(
    deployment: Deployment, role: str, body: Any
) -> None:
    """Issued, served as claimed, and described with the grant's own parameters, never defaults."""
    key = deployment.keys.get(role) or _key(deployment, role)
    r = _token(deployment, key, body)
    assert r.status_code == 200, r.text
    token = r.json()["access_token"]
    deployment.secrets.add(token)
    with deployment.server.client(token) as c:
        meta = c.get(f"/v2/models/{ONNX}")
        answer = c.post(f"/v2/models/{ONNX}/infer", json=infer_body(deployment))
    with deployment.server.client(key) as c:
        own = c.get(f"/v2/models/{ONNX}").json()["parameters"]  # what the key's grant itself sets
    assert meta.status_code == 200 and answer.status_code == 200, (meta.text, answer.text)
    params = meta.json()["parameters"]
    listed = [o["name"] for o in meta.json()["outputs"]]
    served = [o["name"] for o in answer.json()["outputs"]]
    assert params["output_policy"] == body["output"]
    assert listed == served == params["granted_outputs"]
    if body["output"] == "label":
        assert served == ["label"]
    # Every policy parameter described (k, sigma, budgets...) is one the key's own grant describes, with
    # the same value: none is a config default no grant set.
    described = {k: v for k, v in params.items() if k not in _NOT_POLICY}
    assert all(k in own and own[k] == v for k, v in described.items()), (described, own)
    if body["output"] == own["output_policy"]:
        assert described == {k: v for k, v in own.items() if k not in _NOT_POLICY}


_NOT_POLICY = {
    "version",
    "digest",
    "classes",
    "output_policy",
    "granted_outputs",
    "granted_actions",
    "sensitive_inputs_granted",
}


def test_a_token_claim_a_grant_no_longer_serves_is_refused_not_served_with_defaults() -> None:
    """A token issued under one grant and used after the grant changed (a reload) gets infer only when the
    current grant serves its claim with its own parameters; metadata never describes config defaults."""
    from bastion.config import Action, Grant, OutputDetail, Role
    from bastion.policy import Policy, TokenScope

    scope = TokenScope(
        frozenset({(Action.INFER, ONNX), (Action.METADATA, ONNX)}), OutputDetail.PRIVATE_PREDICTION
    )
    for output in ("label", "top_k", "probabilities", "dp_scores"):
        grant = Grant(models=[ONNX], actions=[Action.INFER, Action.METADATA], output=OutputDetail(output))
        narrowed = Policy({"r": Role(grants=[grant])}).grant(("r",), ONNX).narrowed(scope, ONNX)
        assert not narrowed.for_action(Action.INFER).allows(Action.INFER), output
        assert narrowed.for_action(Action.INFER).output is None, output
        assert narrowed.allows(Action.METADATA)  # metadata still answers, describing no output
    served = Grant(models=[ONNX], actions=[Action.INFER], output=OutputDetail.PRIVATE_PREDICTION, sigma=9.0)
    view = Policy({"r": Role(grants=[served])}).grant(("r",), ONNX).narrowed(scope, ONNX)
    assert view.for_action(Action.INFER).output_params.sigma == 9.0


def _regression_body(dep: Deployment) -> dict[str, Any]:
    from bastion.demo import infer_request, train_regressor

    _, features = train_regressor()
    return infer_request(features[:2])


def _modes(state: Path) -> dict[str, str]:
    """Every entry under `state` that is not owner-only: path -> octal mode."""
    wrong = {}
    for path in [state, *state.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if mode != (0o700 if path.is_dir() else 0o600):
            wrong[str(path.relative_to(state.parent))] = oct(mode)
    return wrong


def test_every_file_the_server_writes_in_its_state_is_owner_only(tmp_path: Path) -> None:
    """Under a permissive shell umask (022), the CLI and the server still write state owner-only:
    keys, audit log, budgets, isolation, rollouts, signing keys and SQLite's -wal and -shm beside each."""
    previous = os.umask(0o022)  # what the child processes inherit, as from an ordinary shell
    try:
        config, build = write_test_deployment(tmp_path)
        admin, agg = create_key(config, "admin"), create_key(config, "agg")
        server = start_server(config, tmp_path / "server.log")
    finally:
        os.umask(previous)
    dep = Deployment(server, config, tmp_path, build, {}, secrets={admin, agg})
    try:
        with server.client(admin) as c:
            assert c.post(f"/v2/models/{ONNX}/infer", json=infer_body(dep)).status_code == 200
            assert c.get(f"/v2/models/{ONNX}").status_code == 200
            assert c.get("/metrics").status_code == 200
            assert c.post("/v2/auth/token", json={"scope": [f"infer:{ONNX}"]}).status_code == 200
        with server.client(agg) as c:
            spent = c.post(f"/v2/models/{ONNX}/aggregate", json=infer_body(dep))  # limits.db written
            assert spent.status_code == 200, spent.text
        state = tmp_path / "state"
        names = {p.name for p in state.iterdir()}
        assert {"keys.db-wal", "audit.db-wal", "limits.db-wal", "rollouts.json"} <= names, names
        assert _modes(state) == {}
    finally:
        server.stop()
    assert _modes(tmp_path / "state") == {}


def test_the_demo_writes_its_state_owner_only(tmp_path: Path) -> None:
    """`demo --no-serve` alone (no server has run to tighten state/) under a shell umask of 022."""
    previous = os.umask(0o022)
    try:
        run_cli("demo", "--dir", tmp_path / "demo", "--no-serve")
    finally:
        os.umask(previous)
    state = tmp_path / "demo" / "state"
    assert (state / "keys.db").is_file()
    assert _modes(state) == {}
