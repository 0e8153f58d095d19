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


# Drift is not extraction (red team of issue 12, F1): a client whose whole stream has moved (one
# feature shifted by a standard deviation) was flagged off_manifold at its first batch, so over HTTP
# a population shift quarantined every client and never reached the drift window.


def _send(monitor: ExtractionMonitor, principal: str, rows: np.ndarray) -> Suspicion | None:
    """One request of `rows`, as the server's stages see it: refused whole if a row is out of
    distribution (counted as one refusal), else observed."""
    z, squared = monitor.screen.measure({"x": rows}, ["x"])
    if monitor.screen.first_beyond(squared) is not None:
        return monitor.refused(principal)
    return monitor.observe(principal, z, squared)


@pytest.mark.slow
@pytest.mark.parametrize("data", ["cancer", "diabetes"])
@pytest.mark.parametrize("per_request", [1, 50])
def test_a_stream_shifted_by_one_standard_deviation_is_drift_not_extraction(
    data: str, per_request: int
) -> None:
    """As the demo is set up (the whole data set signed in as reference) and as drift_http.py sends
    it (reference rows, one feature shifted): every feature in turn, +-1 SD, four principals in turn,
    none flagged from the first request to the last; and a principal whose traffic starts genuine,
    shifts and comes back is not flagged either."""
    x = (load_breast_cancer() if data == "cancer" else load_diabetes()).data
    spread = x.std(axis=0)
    for feature in range(x.shape[1]):
        for shift in (1.0, -1.0):
            monitor = _monitor(x)
            rng = np.random.default_rng(feature)
            for request in range(600 // per_request):
                rows = x[rng.choice(len(x), per_request, replace=False)]
                rows[:, feature] += shift * spread[feature]
                found = _send(monitor, f"key:{request % 4}", rows)
                assert found is None, (feature, shift, request, found)
        monitor = _monitor(x)
        order = np.random.default_rng(feature).permutation(len(x))  # no row sent twice
        for phase, part in ((0.0, order[:150]), (1.0, order[150:450]), (0.0, order[450:])):
            for start in range(0, len(part), per_request):
                rows = x[part[start : start + per_request]]
                rows[:, feature] += phase * spread[feature]
                found = _send(monitor, "key:moving", rows)
                assert found is None, (feature, phase, found)


@pytest.mark.parametrize("data", ["cancer", "diabetes"])
@pytest.mark.parametrize("attack", [_perturb(0.3), _perturb(0.01), _sweep, _interpolate, _synthetic])
def test_a_thief_is_flagged_as_before_among_clients_whose_traffic_shifted(data: str, attack: Attack) -> None:
    """The shifted clients' rows move their own centres, not the thief's: it is flagged at the same
    query as on a quiet server, whatever the others send."""
    reference, held_out = _split(data)
    queries = attack(held_out[:10], reference, np.random.default_rng(3))
    alone = _stream(_monitor(reference), queries)
    assert alone is not None
    monitor = _monitor(reference)
    rng = np.random.default_rng(4)
    feature = {"cancer": 3, "diabetes": 5}[data]  # most rows shifted by 1 SD are past the 95th radius
    shifted = reference.copy()
    shifted[:, feature] += reference[:, feature].std()
    assert np.mean(monitor.screen.distances(shifted) > monitor.far_limits[0]) > 0.5
    found = None
    for i, row in enumerate(queries):
        for client in range(5):  # five genuine clients, one feature shifted, between each query
            rows = shifted[rng.choice(len(shifted), 4, replace=False)]
            assert _send(monitor, f"key:client{client}", rows) is None
        found = _send(monitor, "key:thief", row[None])
        if found is not None:
            assert (found.signal, found.queries) == (alone.signal, alone.queries), i
            break
    assert found is not None


@pytest.mark.parametrize("data", ["cancer", "diabetes"])
@pytest.mark.parametrize("attack", [_perturb(0.3), _perturb(0.01), _sweep, _interpolate, _synthetic])
def test_a_thief_that_translates_its_own_stream_is_still_flagged(data: str, attack: Attack) -> None:
    """The attacker's side of the own centre: moving a thief's whole stream by 1 SD of one feature (its
    centre then counts) leaves noise around seeds, sweeps, interpolations and synthetic rows flagged."""
    reference, held_out = _split(data)
    spread = reference.std(axis=0)
    for feature in range(0, reference.shape[1], 3):
        queries = attack(held_out[:10], reference, np.random.default_rng(3)).copy()
        queries[:, feature] += spread[feature]
        found = _stream(_monitor(reference), queries)
        assert found is not None and found.queries <= 160, (feature, found)


@pytest.mark.parametrize("data", ["cancer", "diabetes"])
def test_a_thief_sending_its_noise_in_batches_is_flagged_as_one_row_at_a_time(data: str) -> None:
    """A batch is measured row by row against the rows before it, the batch's own included: a
    thief's first batch does not make its own centre."""
    reference, held_out = _split(data)
    queries = _perturb(0.3)(held_out[:10], reference, np.random.default_rng(3))
    alone = _stream(_monitor(reference), queries)
    assert alone is not None and alone.signal == "off_manifold"
    monitor = _monitor(reference)
    for start in range(0, len(queries), 50):
        found = _send(monitor, "key:thief", queries[start : start + 50])
        if found is not None:
            assert found.signal == "off_manifold" and found.queries == -(-alone.queries // 50) * 50
            return
    raise AssertionError("never flagged")
