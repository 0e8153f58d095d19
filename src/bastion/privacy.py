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

import functools
import hashlib
import math
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

import numpy as np

from bastion.state import BudgetKey

_L2_SENSITIVITY = math.sqrt(2.0)


class NoiseSource(Protocol):
    # Values are released on a grid of this step (0 for exact floats); calibration adds the rounding.
    resolution: float

    def laplace(self, values: np.ndarray, scale: float) -> np.ndarray: ...

    def gaussian(self, values: np.ndarray, scale: float) -> np.ndarray: ...


_FIXED = 2**20  # fixed-point grid: scores are released as multiples of 2^-20
_POOL = 256


class _Pool:
    """Noise drawn ahead for one (mechanism, scale): each sample is used once, then discarded."""

    __slots__ = ("next", "samples", "used")

    def __init__(self, samples: list[int]) -> None:
        self.samples = samples  # a list, not an array: a request takes one or two, as Python ints
        self.used = 0
        self.next: Future[list[int]] | None = None


class OpenDPNoise:
    """OpenDP's discrete Laplace and discrete Gaussian samplers on a fixed-point grid.

    Values are rounded to multiples of 2^-20 and noise is added as integers, so the arithmetic is
    exact and the floating-point attacks on naive Laplace noise do not apply. Because the
    mechanism is x + Z with Z independent of x, OpenDP draws Z in batches of 256 (one call costs
    ~60 us, a sample ~5 us in a batch), each sample used once. The next batch is drawn on a helper
    thread while the current one is spent (OpenDP's native sampler runs without the GIL), so no
    request waits on a refill (measured: a 5 ms refill on the event loop was the p99; batches of
    256 instead of 1024 took the p99 ratio against full probabilities from 1.45 to 1.27).
    """

    resolution = 1.0 / _FIXED

    def __init__(self) -> None:
        import opendp.prelude as dp

        dp.enable_features("contrib")
        self._dp = dp
        self._pools: dict[tuple[str, float], _Pool] = {}
        self._refills = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bastion-noise")

    def _sample(self, kind: str, scale: float, n: int) -> list[int]:
        dp = self._dp
        ints = dp.vector_domain(dp.atom_domain(T="i64"))
        if kind == "laplace":
            measurement = (ints, dp.l1_distance(T="i64")) >> dp.m.then_laplace(scale=scale)
        else:
            measurement = (ints, dp.l2_distance(T="i64")) >> dp.m.then_gaussian(scale=scale)
        samples: list[int] = measurement([0] * n)
        return samples

    def _draw(self, kind: str, scale: float, n: int) -> list[int]:
        key = (kind, scale)
        pool = self._pools.get(key)
        if pool is None or pool.used + n > len(pool.samples):
            if pool is not None and pool.next is not None and n <= _POOL:
                fresh = pool.next.result()
            else:
                fresh = self._sample(kind, scale, max(_POOL, n))
            pool = self._pools[key] = _Pool(fresh)
        taken = pool.samples[pool.used : pool.used + n]
        pool.used += n
        if pool.next is None and 2 * pool.used >= len(pool.samples):
            pool.next = self._refills.submit(self._sample, kind, scale, _POOL)
        return taken

    def laplace(self, values: np.ndarray, scale: float) -> np.ndarray:
        return self._apply("laplace", values, scale)

    def gaussian(self, values: np.ndarray, scale: float) -> np.ndarray:
        return self._apply("gaussian", values, scale)

    def _apply(self, kind: str, values: np.ndarray, scale: float) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        noise = self._draw(kind, scale * _FIXED, values.size)
        if values.size <= _SMALL:
            # A row or two: plain ints beat half a dozen numpy calls on tiny arrays (bench/).
            noisy = [
                (round(v * _FIXED) + z) / _FIXED for v, z in zip(values.ravel().tolist(), noise, strict=True)
            ]
            return np.array(noisy, dtype=np.float64).reshape(values.shape)
        grid = np.rint(values * _FIXED).astype(np.int64)
        return np.asarray((grid + np.asarray(noise, dtype=np.int64).reshape(grid.shape)) / _FIXED)


def laplace_scale(
    epsilon: float, *, coordinates: int = 1, resolution: float = 0.0, sensitivity: float = 2.0
) -> float:
    """Delta_1 / epsilon, with Delta_1 grown by the rounding to the release grid (half a step per value each side)."""
    return (sensitivity + coordinates * resolution) / epsilon


def gaussian_scale(
    epsilon: float,
    delta: float,
    *,
    coordinates: int = 1,
    resolution: float = 0.0,
    sensitivity: float = _L2_SENSITIVITY,
) -> float:
    """The classic (epsilon, delta) calibration: sigma = Delta_2 * sqrt(2 ln(1.25/delta)) / epsilon."""
    return (
        (sensitivity + math.sqrt(coordinates) * resolution) * math.sqrt(2 * math.log(1.25 / delta)) / epsilon
    )


def dp_scores(
    probabilities: np.ndarray, *, mechanism: str, epsilon: float, delta: float, noise: NoiseSource
) -> np.ndarray:
    """Noisy scores, clipped to [0, 1] and renormalised (post-processing keeps the guarantee).

    A binary model's score vector is one number: p1, with p0 = 1 - p1. Releasing p1 alone has
    sensitivity 1 (not 2 for the pair), so a binary answer gets half the noise and one sample.
    """
    p = np.asarray(probabilities, dtype=np.float64)
    if p.shape[1] == 2:
        positive = _noisy_unit(p[:, 1], mechanism=mechanism, epsilon=epsilon, delta=delta, noise=noise)
        if positive.size <= _SMALL:  # a row or two: one list pass beats five numpy calls (bench/)
            return np.array([[1.0 - q, q] for q in positive.tolist()], dtype=np.float64)
        return np.stack((1.0 - positive, positive), axis=1)
    k, res = p.shape[1], noise.resolution
    if mechanism == "laplace":
        noisy = noise.laplace(p, laplace_scale(epsilon, coordinates=k, resolution=res))
    else:
        noisy = noise.gaussian(p, gaussian_scale(epsilon, delta, coordinates=k, resolution=res))
    clipped = np.minimum(np.maximum(noisy, 0.0), 1.0)  # np.clip costs twice as much on small arrays
    sums = clipped.sum(axis=1, keepdims=True)
    uniform = np.full_like(clipped, 1.0 / clipped.shape[1])
    return np.asarray(np.where(sums > 0, clipped / np.where(sums > 0, sums, 1.0), uniform))


def dp_values(
    values: np.ndarray,
    *,
    value_range: tuple[float, float],
    mechanism: str,
    epsilon: float,
    delta: float,
    noise: NoiseSource,
) -> np.ndarray:
    """A regressor's predictions with noise calibrated to the declared range, clamped to it.

    Each value is clamped to [min, max] and scaled to [0, 1], where one row moves it by at most 1
    (L1 and L2 alike), noised on the fixed-point grid like scores, clipped, and scaled back.
    """
    low, high = value_range
    unit = (np.minimum(np.maximum(np.asarray(values, dtype=np.float64), low), high) - low) / (high - low)
    noisy = _noisy_unit(unit, mechanism=mechanism, epsilon=epsilon, delta=delta, noise=noise)
    return np.asarray(low + (high - low) * noisy)


def _noisy_unit(
    unit: np.ndarray, *, mechanism: str, epsilon: float, delta: float, noise: NoiseSource
) -> np.ndarray:
    """Values in [0, 1] (sensitivity 1 each row), with noise, clipped back to [0, 1]."""
    res = noise.resolution
    if mechanism == "laplace":
        noisy = noise.laplace(unit, laplace_scale(epsilon, resolution=res, sensitivity=1.0))
    else:
        noisy = noise.gaussian(unit, gaussian_scale(epsilon, delta, resolution=res, sensitivity=1.0))
    return np.asarray(np.minimum(np.maximum(noisy, 0.0), 1.0))


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


_HEADER = struct.Struct("<dII")  # expires, rows, columns


class AnswerCache:
    """Identical request, same budget row, same model and policy: the identical answer, no budget spent.

    Without it, averaging many noisy answers to one question would wash the noise out. The
    guarantee itself is the budget: an evicted answer asked again is paid for again.
    A key is a 16-byte digest of the ledger row that paid for the answer (principal, model, unit,
    window: an answer is served again only against the row it was charged to, never under another
    grant's budget), the model digest, the input guard's keyed HMAC of the tensors (never the
    inputs) and the policy's parameters; an entry is one bytes object
    (expiry, shape, scores). Entries live in two generations of plain dicts: new answers go into
    the young one, and when it holds half the bound the old one is dropped whole and the young
    one takes its place, so between half and all of `max_entries` of the latest answers are kept
    at O(1) per answer. (Evicting the oldest key of one insertion-ordered dict is not O(1): each
    `next(iter(d))` skips every slot deleted before it; measured in bench/answer_cache.py, 1.6 us
    per answer while filling, then 23 us at 1.5x the bound and 187 us at 4x.)
    """

    def __init__(self, *, max_entries: int = 100_000) -> None:
        self._young: dict[bytes, bytes] = {}
        self._old: dict[bytes, bytes] = {}
        self._half = max(1, max_entries // 2)

    def __len__(self) -> int:
        return len(self._young) + len(self._old)

    @staticmethod
    def key(budget: BudgetKey, model_digest: str, payload_hmac: str, policy: str) -> bytes:
        # Identifiers and hex digests never hold a NUL, so the joined parts are unambiguous.
        joined = "\0".join((budget.render(), model_digest, payload_hmac, policy))
        return hashlib.blake2b(joined.encode(), digest_size=16).digest()

    def get(self, key: bytes, *, now: float) -> np.ndarray | None:
        entry = self._young.get(key) or self._old.get(key)
        if entry is None:
            return None
        expires, rows, columns = _HEADER.unpack_from(entry)
        if now >= expires:
            self._young.pop(key, None)
            self._old.pop(key, None)
            return None
        return np.frombuffer(entry, dtype=np.float64, offset=_HEADER.size).reshape(rows, columns)

    def put(self, key: bytes, scores: np.ndarray, *, expires: float) -> None:
        if len(self._young) >= self._half:
            self._old, self._young = self._young, {}
        scores = np.asarray(scores, dtype=np.float64)  # tobytes() is C order whatever the layout
        self._young[key] = _HEADER.pack(expires, *scores.shape) + scores.tobytes()


@functools.lru_cache(maxsize=1024)
def policy_tag(kind: str, *parameters: str | float) -> str:
    """The policy part of a cache key: an answer under other parameters is another answer."""
    return ":".join((kind, *map(repr, parameters)))
