"""Output perturbation: reverse sigmoid, and differential-privacy noise with per-principal budgets.

DP noise comes from OpenDP's samplers (cryptographically secure randomness, and
discrete sampling that resists floating-point attacks). The `NoiseSource` is
injectable so that tests can be deterministic.

What the guarantee covers: one answered row's score vector is released through
the Laplace mechanism with L1 sensitivity 2 (two probability vectors differ by
at most 2), or the Gaussian mechanism with L2 sensitivity sqrt(2); each row costs
`epsilon` (Gaussian: the epsilon of its (epsilon, delta) guarantee), and a
principal's answers compose additively against `privacy_budget` per window.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from typing import Protocol

import numpy as np

_L2_SENSITIVITY = math.sqrt(2.0)


class NoiseSource(Protocol):
    # Values are released on a grid of this step (0 for exact floats); calibration adds the rounding.
    resolution: float

    def laplace(self, values: np.ndarray, scale: float) -> np.ndarray: ...

    def gaussian(self, values: np.ndarray, scale: float) -> np.ndarray: ...


_FIXED = 2**20  # fixed-point grid: scores are released as multiples of 2^-20
_POOL = 1024


class OpenDPNoise:
    """OpenDP's discrete Laplace and discrete Gaussian samplers on a fixed-point grid.

    Values are rounded to multiples of 2^-20 and noise is added as integers, so the arithmetic is
    exact and the floating-point attacks on naive Laplace noise do not apply. Because the
    mechanism is x + Z with Z independent of x, OpenDP draws Z in batches (one call per 1024
    samples; measured: about 6 us per sample instead of ~115 us per call), each used once.
    """

    resolution = 1.0 / _FIXED

    def __init__(self) -> None:
        import opendp.prelude as dp

        dp.enable_features("contrib")
        self._dp = dp
        self._pools: dict[tuple[str, float], tuple[np.ndarray, int]] = {}

    def _draw(self, kind: str, scale: float, n: int) -> np.ndarray:
        key = (kind, scale)
        samples, used = self._pools.get(key, (np.empty(0, dtype=np.int64), 0))
        if used + n > len(samples):
            dp = self._dp
            ints = dp.vector_domain(dp.atom_domain(T="i64"))
            if kind == "laplace":
                measurement = (ints, dp.l1_distance(T="i64")) >> dp.m.then_laplace(scale=scale)
            else:
                measurement = (ints, dp.l2_distance(T="i64")) >> dp.m.then_gaussian(scale=scale)
            samples, used = np.asarray(measurement([0] * max(_POOL, n)), dtype=np.int64), 0
        self._pools[key] = (samples, used + n)
        return samples[used : used + n]

    def laplace(self, values: np.ndarray, scale: float) -> np.ndarray:
        return self._apply("laplace", values, scale)

    def gaussian(self, values: np.ndarray, scale: float) -> np.ndarray:
        return self._apply("gaussian", values, scale)

    def _apply(self, kind: str, values: np.ndarray, scale: float) -> np.ndarray:
        grid = np.rint(np.asarray(values, dtype=np.float64) * _FIXED).astype(np.int64)
        noise = self._draw(kind, scale * _FIXED, grid.size).reshape(grid.shape)
        return np.asarray((grid + noise) / _FIXED, dtype=np.float64)


def laplace_scale(
    epsilon: float, *, coordinates: int = 1, resolution: float = 0.0, sensitivity: float = 2.0
) -> float:
    """Delta_1 / epsilon, with Delta_1 grown by the rounding to the release grid (half a step per value each side)."""
    return (sensitivity + coordinates * resolution) / epsilon


def gaussian_scale(epsilon: float, delta: float, *, coordinates: int = 1, resolution: float = 0.0) -> float:
    """The classic (epsilon, delta) calibration: sigma = Delta_2 * sqrt(2 ln(1.25/delta)) / epsilon."""
    return (
        (_L2_SENSITIVITY + math.sqrt(coordinates) * resolution)
        * math.sqrt(2 * math.log(1.25 / delta))
        / epsilon
    )


def dp_scores(
    probabilities: np.ndarray, *, mechanism: str, epsilon: float, delta: float, noise: NoiseSource
) -> np.ndarray:
    """Noisy scores, clipped to [0, 1] and renormalised (post-processing keeps the guarantee)."""
    p = np.asarray(probabilities, dtype=np.float64)
    k, res = p.shape[1], noise.resolution
    if mechanism == "laplace":
        noisy = noise.laplace(p, laplace_scale(epsilon, coordinates=k, resolution=res))
    else:
        noisy = noise.gaussian(p, gaussian_scale(epsilon, delta, coordinates=k, resolution=res))
    clipped = np.clip(noisy, 0.0, 1.0)
    sums = clipped.sum(axis=1, keepdims=True)
    uniform = np.full_like(clipped, 1.0 / clipped.shape[1])
    return np.asarray(np.where(sums > 0, clipped / np.where(sums > 0, sums, 1.0), uniform))


def reverse_sigmoid(probabilities: np.ndarray, *, beta: float, gamma: float) -> np.ndarray:
    """Lee et al. 2019: y - beta * (sigmoid(gamma * logit(y)) - 1/2), renormalised, argmax kept.

    The perturbation misleads the gradients a model thief fits to, while the top class
    is guaranteed unchanged (if renormalisation ever moved it, the two entries swap back).
    """
    p = np.asarray(probabilities, dtype=np.float64)
    if p.size <= _SMALL:
        # A request of a row or two: plain floats beat a dozen numpy calls on tiny arrays (bench/).
        return np.asarray([_reverse_sigmoid_row(row, beta, gamma) for row in p.tolist()], dtype=np.float64)
    y = np.clip(p, 1e-9, 1 - 1e-9)
    # sigmoid(gamma * logit(y)) == y^gamma / (y^gamma + (1 - y)^gamma)
    yg = y**gamma
    r = y - beta * (yg / (yg + (1 - y) ** gamma) - 0.5)
    r = np.clip(r, 1e-12, None)
    r = r / r.sum(axis=1, keepdims=True)
    top, new_top = np.argmax(y, axis=1), np.argmax(r, axis=1)
    rows = np.flatnonzero(top != new_top)
    for i in rows:
        r[i, top[i]], r[i, new_top[i]] = r[i, new_top[i]], r[i, top[i]]
    return np.asarray(r)


_SMALL = 32


def _reverse_sigmoid_row(row: list[float], beta: float, gamma: float) -> list[float]:
    y = [min(max(v, 1e-9), 1 - 1e-9) for v in row]
    r = []
    for v in y:
        vg = v**gamma
        r.append(max(v - beta * (vg / (vg + (1 - v) ** gamma) - 0.5), 1e-12))
    total = sum(r)
    r = [v / total for v in r]
    top, new_top = y.index(max(y)), r.index(max(r))
    if top != new_top:
        r[top], r[new_top] = r[new_top], r[top]
    return r


class AnswerCache:
    """Identical request, same principal, same model and policy: the identical answer, no budget spent.

    Without it, averaging many noisy answers to one question would wash the noise out.
    Keys are digests of keyed digests (the input guard's HMAC of the tensors), never the inputs.
    Entries are bytes only, so the garbage collector never walks them (measured: a cache of
    dicts and arrays made full collections cost more than the noise itself).
    """

    def __init__(self, *, max_entries: int = 100_000) -> None:
        self._entries: OrderedDict[bytes, tuple[float, bytes, tuple[int, int]]] = OrderedDict()
        self._max = max_entries

    @staticmethod
    def key(*parts: str) -> bytes:
        return hashlib.sha256("\0".join(parts).encode()).digest()

    def get(self, key: bytes, *, now: float) -> np.ndarray | None:
        hit = self._entries.get(key)
        if hit is None:
            return None
        expires, data, shape = hit
        if now >= expires:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return np.frombuffer(data, dtype=np.float64).reshape(shape)

    def put(self, key: bytes, scores: np.ndarray, *, expires: float) -> None:
        scores = np.ascontiguousarray(scores, dtype=np.float64)
        self._entries[key] = (expires, scores.tobytes(), (scores.shape[0], scores.shape[1]))
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)
