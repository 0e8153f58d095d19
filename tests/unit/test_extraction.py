"""The extraction monitor against genuine streams and the query patterns of model thieves,
on real data (scikit-learn's breast-cancer and diabetes sets): the reference half calibrates,
the other half plays the genuine client and provides the thief's seeds."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from scipy.stats import binom
from sklearn.datasets import load_breast_cancer, load_diabetes

from bastion.extraction import _ALPHA, _MIN_QUERIES, ExtractionMonitor, Suspicion, critical_counts
from bastion.ood import DistributionScreen

Attack = Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray]


def _split(name: str) -> tuple[np.ndarray, np.ndarray]:
    x = (load_breast_cancer() if name == "cancer" else load_diabetes()).data
    order = np.random.default_rng(7).permutation(len(x))
    half = len(x) // 2
    return x[order[:half]], x[order[half:]]


def _monitor(reference: np.ndarray) -> ExtractionMonitor:
    return ExtractionMonitor(DistributionScreen(reference), reference)


def _stream(monitor: ExtractionMonitor, queries: np.ndarray, principal: str = "key:p") -> Suspicion | None:
    """Send queries one a request, as a client would; the first suspicion, or None."""
    for row in queries:
        z, squared = monitor.screen.measure({"x": row[None]}, ["x"])
        if monitor.screen.first_beyond(squared) is not None:
            found = monitor.refused(principal)
        else:
            found = monitor.observe(principal, z, squared)
        if found is not None:
            return found
    return None


@pytest.mark.parametrize("data", ["cancer", "diabetes"])
def test_genuine_clients_raise_nothing(data: str) -> None:
    reference, held_out = _split(data)
    monitor = _monitor(reference)
    rng = np.random.default_rng(1)
    for client in range(20):
        stream = held_out[rng.permutation(len(held_out))]
        retried = np.repeat(stream, 2, axis=0)  # every request sent twice (client retries)
        assert _stream(monitor, retried, f"key:{client}") is None


def _sweep(seeds: np.ndarray, reference: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One feature at a time across its range, around one seed."""
    low, high = reference.min(axis=0), reference.max(axis=0)
    rows = []
    for i in range(600):
        row = seeds[0].copy()
        column = i % len(row)
        row[column] = low[column] + (high[column] - low[column]) * ((i // len(row)) % 10) / 9
        rows.append(row)
    return np.array(rows)


def _perturb(step: float) -> Attack:
    """Jacobian-style augmentation without gradients: seeds moved by +-step standard deviations."""

    def attack(seeds: np.ndarray, reference: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        signs = np.sign(rng.standard_normal((600, seeds.shape[1])))
        return seeds[np.arange(600) % len(seeds)] + step * reference.std(axis=0) * signs

    return attack


def _interpolate(seeds: np.ndarray, reference: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    pairs = np.array([rng.choice(len(seeds), 2, replace=False) for _ in range(600)])
    mix = rng.random((600, 1))
    return mix * seeds[pairs[:, 0]] + (1 - mix) * seeds[pairs[:, 1]]


def _synthetic(seeds: np.ndarray, reference: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Uniform inside the columns' ranges: what a thief without data asks."""
    return rng.uniform(reference.min(axis=0), reference.max(axis=0), (600, reference.shape[1]))


@pytest.mark.parametrize("data", ["cancer", "diabetes"])
@pytest.mark.parametrize(
    ("attack", "within"),
    [(_sweep, 60), (_perturb(0.01), 30), (_perturb(0.3), 100), (_interpolate, 60), (_synthetic, 30)],
)
def test_thieves_are_flagged_within_tens_of_queries(data: str, attack: Attack, within: int) -> None:
    reference, held_out = _split(data)
    monitor = _monitor(reference)
    rng = np.random.default_rng(3)
    found = _stream(monitor, attack(held_out[:10], reference, rng))
    assert found is not None and found.queries <= within, found


def test_principals_are_watched_apart_and_can_start_afresh() -> None:
    reference, held_out = _split("cancer")
    monitor = _monitor(reference)
    thief = _perturb(0.01)(held_out[:10], reference, np.random.default_rng(0))
    assert _stream(monitor, thief[:15], "key:thief") is None  # not enough queries yet
    assert _stream(monitor, held_out[:100], "key:genuine") is None
    assert _stream(monitor, thief[15:], "key:thief") is not None
    monitor.forget("key:thief")
    assert _stream(monitor, held_out[:100], "key:thief") is None


def test_histories_stay_bounded_however_many_principals_come(monkeypatch: pytest.MonkeyPatch) -> None:
    import bastion.extraction as extraction

    monkeypatch.setattr(extraction, "_MAX_PRINCIPALS", 10)
    reference, held_out = _split("cancer")
    monitor = _monitor(reference)
    for i in range(100):
        monitor.observe(f"key:{i}", *monitor.screen.measure({"x": held_out[i : i + 1]}, ["x"]))
        assert len(monitor._young) + len(monitor._old) <= 10
    assert "key:99" in monitor._young and "key:0" not in monitor._young | monitor._old


@pytest.mark.parametrize("rate", [0.002, 0.02, 0.2])
def test_the_count_that_flags_is_the_first_a_genuine_client_reaches_with_probability_below_alpha(
    rate: float,
) -> None:
    critical = critical_counts(rate)
    assert all(k > n for n, k in enumerate(critical[:_MIN_QUERIES]))  # too few queries: never
    for n in (_MIN_QUERIES, 50, 128, 1000, 4096):
        k = critical[n]
        assert binom.sf(k - 1, n, rate) < _ALPHA <= binom.sf(k - 2, n, rate)


def test_a_batch_that_crosses_the_epoch_boundary_is_counted_without_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import bastion.extraction as extraction

    monkeypatch.setattr(extraction, "_EPOCH", 50)
    reference, held_out = _split("cancer")
    monitor = _monitor(reference)
    for start in (0, 40, 80, 120):  # 40 rows a request: the 2nd request passes 50 mid-batch
        batch = held_out[start : start + 40]
        assert monitor.observe("key:p", *monitor.screen.measure({"x": batch}, ["x"])) is None
    assert monitor._young["key:p"].queries < 50
