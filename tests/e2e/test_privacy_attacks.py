"""Membership inference against the running server, per output policy (IBM ART, attack model rf).

The target overfits on purpose: a 200-tree random forest on half of scikit-learn's digits
(train accuracy 1.0); the other half are the non-members. Each policy is attacked through
its own key over HTTP, with a budget large enough that the attacker can ask about every row.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from bastion.bundle.pack import pack
from bastion.bundle.signing import sign_bundle
from bastion.demo import infer_request
from bastion.manifest import InputSpec, OutputSpec
from bastion.redteam import MembershipResult, membership_inference
from tests.helpers import RunningServer, create_key, start_server, write_test_deployment

POLICIES = {
    "mi_label": 'output = "label"',
    "mi_full": 'output = "probabilities"',
    "mi_dp10": 'output = "dp_scores"\nepsilon = 10.0\nprivacy_budget = 1e9',
    "mi_dp1": 'output = "dp_scores"\nepsilon = 1.0\nprivacy_budget = 1e9',
    "mi_dp01": 'output = "dp_scores"\nepsilon = 0.1\nprivacy_budget = 1e9',
    "mi_private": 'output = "private_prediction"\nsigma = 4.0\nprivacy_budget = 1e9\nglobal_privacy_budget = 1e9',
}
MODEL_OF = {"mi_private": "digits-private"}


def attacked_deployment(root):  # type: ignore[no-untyped-def]
    from sklearn.datasets import load_digits
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.model_selection import train_test_split

    from bastion.demo import write_skops_model

    config, build = write_test_deployment(root)
    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    mx, nx, my, ny = train_test_split(x, y, test_size=0.5, random_state=0, stratify=y)
    target = RandomForestClassifier(n_estimators=200, random_state=0).fit(mx, my)
    assert target.score(mx, my) == 1.0  # it overfits, as the attack needs
    spec = InputSpec(name="pixels", datatype="FP32", shape=[-1, 64], min=0.0, max=16.0)
    classes = OutputSpec(classes=[str(i) for i in range(10)])
    write_skops_model(root / "models" / "digits", target, [spec], classes, "digits")
    build.publish(root / "models" / "digits")
    # The same estimator as ten teachers on disjoint tenths of the members, for private prediction.
    write_skops_model(root / "models" / "digits-private", target, [spec], classes, "digits-private")
    bundle = root / "bundles" / "digits-private-1"
    pack(root / "models" / "digits-private", bundle, teachers=10, training_data=(mx, my))
    sign_bundle(bundle, build.signing_key, build.passphrase)
    text = config.read_text()
    roles = "".join(
        f"\n[roles.{name}]\nrate = 100000\nburst = 100000\ndaily_quota = 100000000\n"
        f'[[roles.{name}.grants]]\nmodels = ["{MODEL_OF.get(name, "digits")}"]\n'
        f'actions = ["infer", "metadata"]\n{policy}\n'
        for name, policy in POLICIES.items()
    )
    at = text.index("[roles.analyst]")
    models = "".join(
        f'[[models]]\npath = "bundles/{b}"\ntrusted_keys = ["keys/release.pub"]\n\n'
        for b in ("digits-1", "digits-private-1")
    )
    text = text[:at] + models + text[at:]
    config.write_text(text + roles)
    return config, (mx, my), (nx, ny)


def remote_predict(server, key: str, model: str = "digits"):  # type: ignore[no-untyped-def]
    def predict(x: np.ndarray) -> np.ndarray:
        out = []
        with server.client(key) as c:
            for start in range(0, len(x), 256):
                body = infer_request(x[start : start + 256], name="pixels")
                r = c.post(f"/v2/models/{model}/infer", json=body)
                assert r.status_code == 200, r.text
                outputs = {o["name"]: o for o in r.json()["outputs"]}
                if "probabilities" in outputs:
                    p = np.asarray(outputs["probabilities"]["data"]).reshape(
                        outputs["probabilities"]["shape"]
                    )
                else:  # label only: all the attacker learns is a one-hot vector
                    p = np.eye(10)[[int(v) for v in outputs["label"]["data"]]]
                out.append(p)
        return np.concatenate(out)

    return predict


@dataclass
class Attacked:
    server: RunningServer
    config: Path
    members: tuple[np.ndarray, np.ndarray]
    nonmembers: tuple[np.ndarray, np.ndarray]


@pytest.fixture(scope="module")
def attacked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Attacked]:
    root = tmp_path_factory.mktemp("privacy")
    config, members, nonmembers = attacked_deployment(root)
    server = start_server(config, root / "server.log")
    yield Attacked(server, config, members, nonmembers)
    server.stop()


@pytest.fixture(scope="module")
def results(attacked: Attacked) -> dict[str, MembershipResult]:
    return {
        name: membership_inference(
            remote_predict(attacked.server, create_key(attacked.config, name), MODEL_OF.get(name, "digits")),
            members=attacked.members,
            nonmembers=attacked.nonmembers,
            nb_classes=10,
            clip_values=(0.0, 16.0),
        )
        for name in POLICIES
    }


def test_the_attack_works_on_full_scores(results: dict[str, MembershipResult]) -> None:
    assert results["mi_full"].auc > 0.6  # the baseline leaks: otherwise the other checks prove nothing


def test_label_only_output_leaves_almost_nothing(results: dict[str, MembershipResult]) -> None:
    assert results["mi_label"].tpr_at_1pct_fpr <= 0.02
    assert results["mi_label"].benign_accuracy > 0.9


def test_dp_scores_attack_auc_falls_with_epsilon(results: dict[str, MembershipResult]) -> None:
    full, e10, e1, e01 = (results[k].auc for k in ("mi_full", "mi_dp10", "mi_dp1", "mi_dp01"))
    assert full > e10 + 0.1  # the first step of noise already removes most of the signal
    # Monotone within sampling error: near chance, an AUC over ~450 rows a side varies by about 0.025.
    assert e10 >= e1 - 0.05 and e1 >= e01 - 0.05
    assert e01 < 0.58


def test_private_prediction_defeats_black_box_and_gap_attacks(results: dict[str, MembershipResult]) -> None:
    r = results["mi_private"]
    assert r.auc <= 0.55 and r.accuracy <= 0.55
    assert r.gap_accuracy <= 0.55
    assert r.benign_accuracy > 0.5  # far above chance (0.1): the answers still carry the teachers' consensus


def _gate(
    attacked: Attacked, tmp_path: Path, role: str, *thresholds: str, key: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`bastion redteam membership` against the running server, as a deployment pipeline would run it:
    the attacker's key in BASTION_KEY (a new key of `role`, or `key`; "" leaves it unset)."""
    for name, (x, y) in (("members", attacked.members), ("nonmembers", attacked.nonmembers)):
        np.savez(tmp_path / f"{name}.npz", x=x, y=y)
    command = [
        sys.executable,
        "-m",
        "bastion.cli",
        "redteam",
        "membership",
        "--url",
        attacked.server.base_url,
    ]
    command += ["--model", MODEL_OF.get(role, "digits"), "--members", str(tmp_path / "members.npz")]
    command += ["--nonmembers", str(tmp_path / "nonmembers.npz"), *thresholds]
    env = {k: v for k, v in os.environ.items() if k != "BASTION_KEY"}
    if key != "":
        env["BASTION_KEY"] = key or create_key(attacked.config, role)
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def test_the_cli_gate_passes_label_only_output(attacked: Attacked, tmp_path: Path) -> None:
    done = _gate(
        attacked, tmp_path, "mi_label", "--max-tpr-at-1pct-fpr", "0.02", "--min-benign-accuracy", "0.9"
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["passed"] is True and report["tpr_at_1pct_fpr"] <= 0.02 and report["model"] == "digits"


def test_the_cli_gate_stops_a_deployment_that_leaks_scores(attacked: Attacked, tmp_path: Path) -> None:
    done = _gate(attacked, tmp_path, "mi_full", "--max-auc", "0.6")
    assert done.returncode == 1
    report = json.loads(done.stdout)
    assert report["passed"] is False and report["auc"] > 0.6
    assert "privacy gate failed: auc" in done.stderr


def test_the_cli_gate_says_what_is_wrong_and_never_echoes_the_key(attacked: Attacked, tmp_path: Path) -> None:
    missing = _gate(attacked, tmp_path, "mi_label", key="")
    assert missing.returncode == 2 and "set BASTION_KEY" in missing.stderr
    refused = _gate(attacked, tmp_path, "mi_label", key="bst_0000000000000000_not-a-real-key")
    assert refused.returncode == 2 and "HTTP 401 (unauthenticated" in refused.stderr
    assert "not-a-real-key" not in refused.stderr + refused.stdout
    assert "Traceback" not in refused.stderr
