"""The demo's input bounds do not give the training set's extremes away (red team #9 F14).

Bounds answer any caller with an infer grant: a request outside them is refused, so a binary search
finds each one. The demo made them the training range widened by a quarter of its span each side,
rounded to 4 decimals: two bounds, two unknowns, and a label-only key solved for every feature's
exact training minimum and maximum (the records at the extremes).
"""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_breast_cancer, load_diabetes

from bastion.demo import feature_spec


def test_demo_bounds_hold_the_training_data_and_do_not_reveal_its_extremes() -> None:
    for data in (load_breast_cancer().data, load_diabetes().data):
        x = data.astype(np.float32).astype(np.float64)
        spec = feature_spec(x)
        low, high = np.asarray(spec.min, dtype=np.float64), np.asarray(spec.max, dtype=np.float64)
        assert (low <= x.min(axis=0)).all() and (high >= x.max(axis=0)).all()
        # The attacker's inversion of "widened by a quarter each side".
        span = (high - low) / 1.5
        recovered_max = np.isclose(high - span / 4, x.max(axis=0), rtol=1e-4, atol=2e-4)
        recovered_min = np.isclose(low + span / 4, x.min(axis=0), rtol=1e-4, atol=2e-4)
        assert recovered_max.sum() <= 1 and recovered_min.sum() <= 1, (
            recovered_max.sum(),
            recovered_min.sum(),
        )
