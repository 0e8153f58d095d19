"""Privacy red-team harness: attack a served model over its real API and measure what leaks.

`membership_inference` runs IBM ART's black-box membership inference attack (attack
model `rf`: no deep-learning framework needed) and the label-only gap attack
against any `predict` function, normally one that queries a running server with
the attacker's key. Half of the known members and non-members train the attack,
the other half measure it. The numbers can gate a deployment: see
`tests/e2e/test_privacy_attacks.py` and `bench/privacy.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MembershipResult:
    auc: float  # attack ROC AUC: 0.5 is a coin toss
    accuracy: float  # attack accuracy on balanced members / non-members at threshold 0.5
    tpr_at_1pct_fpr: float  # members found while wrongly accusing at most 1% of non-members
    gap_accuracy: float  # label-only gap attack: "correctly classified => member"
    benign_accuracy: float  # accuracy of the served answers on non-members


def membership_inference(
    predict: Callable[[np.ndarray], np.ndarray],
    *,
    members: tuple[np.ndarray, np.ndarray],
    nonmembers: tuple[np.ndarray, np.ndarray],
    nb_classes: int,
    clip_values: tuple[float, float],
    seed: int = 0,
) -> MembershipResult:
    from art.attacks.inference.membership_inference import MembershipInferenceBlackBox
    from art.estimators.classification import BlackBoxClassifier
    from sklearn.metrics import roc_auc_score, roc_curve

    rng = np.random.default_rng(seed)
    (mx, my), (nx, ny) = members, nonmembers
    n = min(len(mx), len(nx))
    mi, ni = rng.permutation(len(mx))[:n], rng.permutation(len(nx))[:n]
    half = n // 2
    one_hot = np.eye(nb_classes)
    pm, pn = predict(mx[mi]), predict(nx[ni])  # one pass each: every answer the attacker sees

    classifier = BlackBoxClassifier(
        predict, input_shape=tuple(mx.shape[1:]), nb_classes=nb_classes, clip_values=clip_values
    )
    attack = MembershipInferenceBlackBox(classifier, input_type="prediction", attack_model_type="rf")
    attack.fit(
        x=mx[mi][:half],
        y=one_hot[my[mi][:half]],
        test_x=nx[ni][:half],
        test_y=one_hot[ny[ni][:half]],
        pred=pm[:half],
        test_pred=pn[:half],
    )
    s_m = np.ravel(attack.infer(mx[mi][half:], one_hot[my[mi][half:]], pred=pm[half:], probabilities=True))
    s_n = np.ravel(attack.infer(nx[ni][half:], one_hot[ny[ni][half:]], pred=pn[half:], probabilities=True))
    truth = np.r_[np.ones(len(s_m)), np.zeros(len(s_n))]
    scores = np.r_[s_m, s_n]
    fpr, tpr, _ = roc_curve(truth, scores)
    correct_m = pm[half:].argmax(axis=1) == my[mi][half:]
    correct_n = pn[half:].argmax(axis=1) == ny[ni][half:]
    return MembershipResult(
        auc=float(roc_auc_score(truth, scores)),
        accuracy=float(((scores >= 0.5) == truth).mean()),
        tpr_at_1pct_fpr=float(tpr[fpr <= 0.01].max(initial=0.0)),
        gap_accuracy=float((correct_m.sum() + (~correct_n).sum()) / (len(correct_m) + len(correct_n))),
        benign_accuracy=float((pn.argmax(axis=1) == ny[ni]).mean()),
    )
