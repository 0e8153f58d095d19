"""An exact discrete Laplace sampler, vectorised: Canonne, Kamath and Steinke (2020), Algorithm 2.

The same algorithm OpenDP implements, written over numpy arrays so that thousands of samples cost
a few dozen array operations instead of ~10 calls into OpenSSL each (what OpenDP's wheel does per
sample: bench/PRIVACY.md). Every step is integer arithmetic on uniform integers drawn by
rejection from the operating system's CSPRNG, so the output distribution is exactly
P(x) proportional to exp(-|x| / t): no floating point, hence none of the floating-point attacks
on naive Laplace noise. The scale is an integer (callers round it up: more noise, never less).

Tested against the exact probability mass function and against OpenDP's own sampler
(tests/unit/test_sampler.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

RandomBytes = Callable[[int], bytes]

_TWO_64_MOD_ZERO = np.uint64(0)


def _uniform_below(bound: np.ndarray, random_bytes: RandomBytes) -> np.ndarray:
    """One uniform integer in [0, bound[i]) for each i (bound >= 1, < 2^63), exactly: 64 random
    bits, rejected when they fall in the incomplete last copy of [0, bound) below 2^64."""
    bound = bound.astype(np.uint64)
    # 2^64 mod b, computed in uint64 as (2^64 - b) mod b (the subtraction wraps).
    excess = (_TWO_64_MOD_ZERO - bound) % bound
    out = np.empty(len(bound), dtype=np.uint64)
    todo = np.arange(len(bound))
    while len(todo):
        draws = np.frombuffer(random_bytes(8 * len(todo)), dtype=np.uint64)
        # Accept draws below 2^64 - excess, i.e. draws <= 2^64 - 1 - excess.
        ok = draws <= (np.uint64(2**64 - 1) - excess[todo])
        out[todo[ok]] = draws[ok] % bound[todo[ok]]
        todo = todo[~ok]
    return out.astype(np.int64)


def _bernoulli_exp(numerator: np.ndarray, denominator: np.ndarray, random_bytes: RandomBytes) -> np.ndarray:
    """Bernoulli(exp(-n/d)) for each n/d in [0, 1] (CKS20 Algorithm 1): K counts how many
    Bernoulli(n/(d K)) draws succeed in a row; the answer is whether that run ends at odd K."""
    k = np.ones(len(numerator), dtype=np.int64)
    active = np.arange(len(numerator))
    while len(active):
        success = _uniform_below(denominator[active] * k[active], random_bytes) < numerator[active]
        k[active[success]] += 1
        active = active[success]
    return np.asarray(k % 2 == 1)


def _geometric_exp_minus_one(n: int, random_bytes: RandomBytes) -> np.ndarray:
    """How many Bernoulli(exp(-1)) successes before the first failure, n times."""
    count = np.zeros(n, dtype=np.int64)
    active = np.arange(n)
    ones = np.ones(n, dtype=np.int64)
    while len(active):
        success = _bernoulli_exp(ones[: len(active)], ones[: len(active)], random_bytes)
        count[active[success]] += 1
        active = active[success]
    return count


def discrete_laplace(scale: int, n: int, *, random_bytes: RandomBytes = os.urandom) -> np.ndarray:
    """n independent samples of the discrete Laplace distribution with integer scale t >= 1:
    P(x) = (e^(1/t) - 1) / (e^(1/t) + 1) * e^(-|x| / t) for every integer x."""
    if scale < 1 or scale >= 2**40:
        raise ValueError(f"scale {scale} is outside [1, 2^40)")
    out = np.empty(0, dtype=np.int64)
    while len(out) < n:
        m = max(64, 2 * (n - len(out)))  # about 40% of candidates survive both rejections
        t = np.full(m, scale, dtype=np.int64)
        u = _uniform_below(t, random_bytes)
        u = u[_bernoulli_exp(u, t, random_bytes)]  # U with probability proportional to e^(-U/t)
        x = u + scale * _geometric_exp_minus_one(len(u), random_bytes)  # |Y|, geometric
        negative = _uniform_below(np.full(len(x), 2, dtype=np.int64), random_bytes) == 1
        keep = ~(negative & (x == 0))  # -0 would count zero twice
        out = np.concatenate([out, np.where(negative, -x, x)[keep]])
    return out[:n]
