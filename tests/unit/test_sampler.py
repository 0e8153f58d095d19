"""The vectorised discrete Laplace sampler against the exact distribution and against OpenDP."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
from scipy.stats import chi2_contingency, chisquare

from bastion.privacy import OpenDPNoise, VectorizedNoise
from bastion.sampler import _uniform_below, discrete_laplace


def _pmf(x: np.ndarray, t: int) -> np.ndarray:
    q = math.exp(-1 / t)
    return np.asarray((1 - q) / (1 + q) * q ** np.abs(x))


def _binned(samples: np.ndarray, t: int, c: int) -> tuple[np.ndarray, np.ndarray]:
    """Observed and expected (at scale t) counts for each integer in [-c, c], and both tails."""
    edges = np.arange(-c, c + 1)
    observed = np.array([np.sum(samples < -c), *[np.sum(samples == v) for v in edges], np.sum(samples > c)])
    inside = _pmf(edges, t)
    tail = (1 - inside.sum()) / 2
    expected = np.array([tail, *inside, tail]) * len(samples)
    return observed, expected


@pytest.mark.parametrize("t", [1, 2, 3, 7])
def test_samples_follow_the_exact_discrete_laplace_distribution(t: int) -> None:
    rng = np.random.default_rng(t)
    samples = discrete_laplace(t, 200_000, random_bytes=rng.bytes)
    observed, expected = _binned(samples, t, 4 * t)
    assert chisquare(observed, expected).pvalue > 1e-3
    # And a wrong scale is told apart by the same test: it has the power to see a mistake.
    _, wrong = _binned(samples, t + 1, 4 * t)
    assert chisquare(observed, wrong).pvalue < 1e-6


def test_large_scales_have_the_right_spread_and_no_bias() -> None:
    t = 2**21
    samples = discrete_laplace(t, 200_000, random_bytes=np.random.default_rng(0).bytes)
    q = math.exp(-1 / t)
    variance = 2 * q / (1 - q) ** 2
    assert abs(samples.mean()) < 5 * math.sqrt(variance / len(samples))
    assert samples.var() == pytest.approx(variance, rel=0.02)
    assert np.mean(samples > 0) == pytest.approx(np.mean(samples < 0), abs=0.01)


def test_the_same_distribution_as_opendps_sampler() -> None:
    t = 3
    ours = discrete_laplace(t, 20_000, random_bytes=np.random.default_rng(5).bytes)
    theirs = np.array(OpenDPNoise()._sample("laplace", float(t), 20_000))
    values = np.arange(-12, 13)
    table = np.array([[np.sum(s == v) for v in values] for s in (ours, theirs)])
    table = table[:, table.min(axis=0) >= 5]
    assert chi2_contingency(table).pvalue > 1e-3


def _scripted(chunks: list[int]) -> Iterator[bytes]:
    for value in chunks:
        yield int(value).to_bytes(8, "little")


def test_uniform_integers_reject_the_biased_top_of_the_64_bit_range() -> None:
    """For bound 3, 2^64 mod 3 = 1: the single largest 64-bit draw must be rejected, else 0 would
    be (very slightly) more likely than 1 and 2."""
    draws = _scripted([2**64 - 1, 2**64 - 2, 7])
    got = _uniform_below(np.array([3, 3]), lambda n: b"".join(next(draws) for _ in range(n // 8)))
    assert got.tolist() == [7 % 3, (2**64 - 2) % 3]  # the first draw was redrawn as 7


def test_invalid_scales_are_refused() -> None:
    for scale in (0, -1, 2**40):
        with pytest.raises(ValueError, match="scale"):
            discrete_laplace(scale, 1)


def test_the_vectorized_source_rounds_the_grid_scale_up_and_keeps_opendp_for_gaussian() -> None:
    noise = VectorizedNoise()
    samples = np.array(noise._sample("laplace", 2.5, 100_000))
    # Scale 3 (2.5 rounded up): P(0) = (1 - e^-1/3) / (1 + e^-1/3) = 0.165; at scale 2.5 it would be 0.197.
    assert np.mean(samples == 0) == pytest.approx(0.1651, abs=0.006)
    gaussian = np.array(noise._sample("gaussian", 10.0, 20_000))
    assert gaussian.std() == pytest.approx(10.0, rel=0.05)
