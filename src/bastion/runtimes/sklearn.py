"""scikit-learn estimators: saved with skops (only allow-listed types are built), or, when the
operator explicitly trusts it, a pickle that passed the opcode scan."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import skops.io as sio

from bastion.errors import ModelLoadError
from bastion.manifest import Manifest
from bastion.runtimes.picklescan import scan_pickle


class SklearnRuntime:
    def __init__(self, estimator: Any, input_names: list[str], *, regression: bool) -> None:
        self._estimator = estimator
        self._input_names = input_names
        self._regression = regression

    @classmethod
    def from_skops(cls, path: Path, data: bytes, manifest: Manifest) -> SklearnRuntime:
        try:
            untrusted = sio.get_untrusted_types(data=data)
        except Exception as e:  # skops raises a mix of zipfile/json/key errors on a bad file
            raise ModelLoadError(f"{path}: not a readable skops file: {type(e).__name__}") from None
        unvouched = sorted(set(untrusted) - set(manifest.trusted_types))
        if unvouched:
            raise ModelLoadError(
                f"{path}: refused: the file builds types nobody vouched for: {', '.join(unvouched)}. "
                "If you trust them, list them in the manifest's trusted_types."
            )
        try:
            estimator = sio.loads(data, trusted=list(untrusted))
        except Exception as e:
            raise ModelLoadError(f"{path}: skops could not load the model: {type(e).__name__}: {e}") from None
        return cls._checked(path, estimator, manifest)

    @classmethod
    def from_trusted_pickle(cls, path: Path, data: bytes, manifest: Manifest) -> SklearnRuntime:
        """Only with `unsafe_trust_pickle`; the opcode scan still refuses anything outside the allow-list."""
        scan_pickle(path, data)
        try:
            estimator = pickle.loads(data)  # noqa: S301 (explicitly trusted by the operator, and scanned)
        except Exception as e:
            raise ModelLoadError(f"{path}: the pickle could not be loaded: {type(e).__name__}") from None
        return cls._checked(path, estimator, manifest)

    @classmethod
    def _checked(cls, path: Path, estimator: Any, manifest: Manifest) -> SklearnRuntime:
        regression = manifest.outputs.is_regression
        if regression and (hasattr(estimator, "classes_") or not hasattr(estimator, "predict")):
            raise ModelLoadError(
                f"{path}: the manifest declares a regressor (outputs.value_range) but the estimator "
                "is a classifier or has no predict"
            )
        if not regression and not hasattr(estimator, "predict_proba"):
            raise ModelLoadError(
                f"{path}: the estimator has no predict_proba; a classifier is needed for outputs.classes "
                "(for a regressor, declare outputs.value_range)"
            )
        # The model's own signature: its feature count must match the manifest's columns.
        n_features = getattr(estimator, "n_features_in_", None)
        declared = sum(spec.shape[-1] if len(spec.shape) > 1 else 1 for spec in manifest.inputs)
        if n_features is not None and n_features != declared:
            raise ModelLoadError(
                f"{path}: the estimator expects {n_features} features but the manifest declares {declared}"
            )
        n_classes = len(getattr(estimator, "classes_", []))
        if n_classes and n_classes != manifest.outputs.width:
            raise ModelLoadError(
                f"{path}: the estimator has {n_classes} classes but the manifest names {manifest.outputs.width}"
            )
        return cls(estimator, [s.name for s in manifest.inputs], regression=regression)

    def predict(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        # Several declared inputs are the estimator's columns, concatenated in manifest order.
        columns = [inputs[n].reshape(inputs[n].shape[0], -1) for n in self._input_names]
        matrix = columns[0] if len(columns) == 1 else np.concatenate(columns, axis=1)
        if self._regression:
            return np.asarray(self._estimator.predict(matrix), dtype=np.float64).reshape(-1, 1)
        return np.asarray(self._estimator.predict_proba(matrix))
