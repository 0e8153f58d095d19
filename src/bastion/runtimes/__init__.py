"""Model runtimes behind one small interface.

A runtime loads one model file, checks the model's own signature against the
manifest, and predicts for a batch: class probabilities for a classifier, one
value per row for a regressor. Formats that execute
code when loaded (pickle, joblib, torch's pickle archives) are refused before
any byte of them is deserialised.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from bastion.errors import ModelLoadError
from bastion.manifest import Manifest

# Extensions of formats whose loaders run arbitrary code.
_CODE_EXECUTING_SUFFIXES = {
    ".pkl": "pickle",
    ".pickle": "pickle",
    ".joblib": "joblib",
    ".pt": "torch (pickle)",
    ".pth": "torch (pickle)",
    ".bin": "pickle-based checkpoint",
    ".dill": "dill",
    ".cloudpickle": "cloudpickle",
}


class ModelRuntime(Protocol):
    """What the server needs from a model: its prediction for a batch of rows."""

    def predict(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """For validated inputs: float probabilities of shape (rows, classes) for a classifier,
        values of shape (rows, 1) for a regressor (the manifest's `outputs` says which)."""
        ...


def pickle_format(path: Path, head: bytes) -> str | None:
    """The pickle-family format of a file, judged by its name and its first bytes; None if not one."""
    fmt = _CODE_EXECUTING_SUFFIXES.get(path.suffix.lower())
    # Pickle protocol 2+ starts with PROTO (0x80) and a version byte; joblib/numpy-pickle too.
    if fmt is None and len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        fmt = "pickle"
    return fmt


def load_runtime(
    model_dir: Path, manifest: Manifest, data: bytes | None = None, *, unsafe_trust_pickle: bool = False
) -> ModelRuntime:
    """Load the model from `data` (already read, or decrypted in memory) or from its file."""
    path = model_dir / manifest.file
    if data is None:
        if not path.is_file():
            raise ModelLoadError(f"{path}: model file not found")
        data = path.read_bytes()
    fmt = pickle_format(path, data[:2])
    if fmt is not None:
        if not unsafe_trust_pickle or manifest.runtime != "sklearn":
            raise ModelLoadError(
                f"{path}: format {fmt!r} refused: its loader executes arbitrary code from the file. "
                "Save the model with skops (runtime 'sklearn') or export it to ONNX (runtime 'onnx')."
            )
        from bastion.runtimes.sklearn import SklearnRuntime

        return SklearnRuntime.from_trusted_pickle(path, data, manifest)
    if manifest.runtime == "onnx":
        from bastion.runtimes.onnx import OnnxRuntime

        return OnnxRuntime.load(path, data, manifest)
    from bastion.runtimes.sklearn import SklearnRuntime

    return SklearnRuntime.from_skops(path, data, manifest)
