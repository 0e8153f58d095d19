"""Membership inference against each output policy, over HTTP: the table in bench/PRIVACY.md.

Uses the same deployment and harness as tests/e2e/test_privacy_attacks.py (which asserts on the
same numbers): an overfit 200-tree random forest on half of scikit-learn's digits, attacked with
IBM ART's black-box membership inference (attack model rf) and the label-only gap attack.

    .venv/bin/python bench/privacy.py [--seeds 3]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore", message="PyTorch not found")

from tests.e2e.test_privacy_attacks import MODEL_OF, POLICIES, attacked_deployment, remote_predict  # noqa: E402
from tests.helpers import create_key, start_server  # noqa: E402

from bastion.redteam import membership_inference  # noqa: E402

EPSILON = {"mi_dp10": "10", "mi_dp1": "1", "mi_dp01": "0.1", "mi_private": "rho 0.0625 (sigma 4)"}
NAMES = {
    "mi_label": "label",
    "mi_full": "probabilities",
    "mi_dp10": "dp_scores",
    "mi_dp1": "dp_scores",
    "mi_dp01": "dp_scores",
    "mi_private": "private_prediction (10 teachers)",
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3, help="attack splits to average over")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bastion-privacy-"))
    try:
        config, members, nonmembers = attacked_deployment(root)
        server = start_server(config, root / "server.log")
        try:
            print(
                "| policy | epsilon per answer | attack AUC | attack accuracy | TPR at 1% FPR "
                "| gap attack accuracy | benign accuracy |"
            )
            print("|---|---|---|---|---|---|---|")
            for name in POLICIES:
                predict = remote_predict(server, create_key(config, name), MODEL_OF.get(name, "digits"))
                runs = [
                    membership_inference(
                        predict,
                        members=members,
                        nonmembers=nonmembers,
                        nb_classes=10,
                        clip_values=(0.0, 16.0),
                        seed=s,
                    )
                    for s in range(args.seeds)
                ]

                def mean(field: str, runs: list = runs) -> float:  # type: ignore[type-arg]
                    return sum(getattr(r, field) for r in runs) / len(runs)

                print(
                    f"| {NAMES[name]} | {EPSILON.get(name, '-')} | {mean('auc'):.3f} | {mean('accuracy'):.3f} "
                    f"| {mean('tpr_at_1pct_fpr'):.3f} | {mean('gap_accuracy'):.3f} "
                    f"| {mean('benign_accuracy'):.3f} |",
                    flush=True,
                )
        finally:
            server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
