"""Out-of-distribution screening against the bundle's signed reference dataset.

A row can pass every per-column bound of the manifest and still lie where no real
input does: a model thief's queries, drawn uniformly inside the bounds, are the
common case. The screen measures each row's Mahalanobis distance to the reference
data (columns standardised, correlations kept, a small ridge for stability) and
refuses rows farther than the reference data's own 99.9th percentile times a margin.
The limit comes from the signed data, never from the requests, so an attacker
cannot move it.
"""

from __future__ import annotations

import math

import numpy as np

_QUANTILE = 0.999
_MARGIN = 1.5  # a genuine row a little past the reference's own extremes still passes
_RIDGE = 1e-3  # added to the correlation matrix's diagonal: near-duplicate columns stay invertible


class DistributionScreen:
    def __init__(self, reference: np.ndarray) -> None:
        x = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)
        if x.shape[0] < 2 * x.shape[1]:
            raise ValueError(f"{x.shape[0]} reference rows cannot describe {x.shape[1]} columns")
        mean = x.mean(axis=0)
        std = x.std(axis=0)
        scale = np.where(std > 0, std, 1.0)
        correlation = np.cov((x - mean) / scale, rowvar=False) + _RIDGE * np.eye(x.shape[1])
        # distance(row) = || (row - mean) @ map ||: L^-1 of the correlation (= L L^T) and the column
        # scales folded into one matrix, since this runs on every request.
        whiten = np.linalg.inv(np.linalg.cholesky(correlation)).T
        self._mean = mean
        self._map = whiten / scale[:, None]
        self.limit = float(np.quantile(self.distances(x), _QUANTILE) * _MARGIN)
        self._limit_squared = self.limit**2

    @classmethod
    def for_inputs(cls, reference: dict[str, np.ndarray], names: list[str]) -> DistributionScreen:
        return cls(input_rows(reference, names))

    @property
    def columns(self) -> int:
        return len(self._mean)

    def whiten(self, x: np.ndarray) -> np.ndarray:
        """Rows in the space where the distance to the reference's centre is the plain norm."""
        # The column count is the screen's own: reshape(n, -1) cannot infer it for 0 rows.
        return np.asarray((x.reshape(len(x), self.columns) - self._mean) @ self._map)

    def _squared(self, x: np.ndarray) -> np.ndarray:
        z = self.whiten(x)
        return np.asarray(np.einsum("ij,ij->i", z, z))

    def distances(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(np.sqrt(self._squared(x)))

    def measure(self, inputs: dict[str, np.ndarray], names: list[str]) -> tuple[np.ndarray, list[float]]:
        """The rows whitened, and their squared distances to the reference's centre. Computed once
        per request by the input guard and reused by query auditing."""
        z = self.whiten(input_rows(inputs, names))
        # The common request is one row: a dot product beats einsum's set-up (bench/RESULTS.md).
        squared = [float(z[0] @ z[0])] if len(z) == 1 else np.einsum("ij,ij->i", z, z).tolist()
        return z, squared

    def first_beyond(self, squared: list[float]) -> int | None:
        """The first row farther than the limit, or None."""
        limit = self._limit_squared
        return next((i for i, s in enumerate(squared) if s > limit), None)

    def first_outlier(self, inputs: dict[str, np.ndarray], names: list[str]) -> int | None:
        return self.first_beyond(self.measure(inputs, names)[1])


def input_rows(inputs: dict[str, np.ndarray], names: list[str]) -> np.ndarray:
    """One matrix: every input's columns, in manifest order (as the runtimes see them)."""
    if len(names) == 1:
        return inputs[names[0]]
    columns = [inputs[n].reshape(len(inputs[n]), math.prod(inputs[n].shape[1:])) for n in names]
    return np.concatenate(columns, axis=1)
