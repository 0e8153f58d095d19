"""Model runtimes behind one small interface.

A runtime loads one model file, checks the model's own signature against the
manifest, and predicts class probabilities for a batch. Formats that execute
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
    """What the server needs from a model: probabilities for a batch of rows."""

    def predict_proba(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Return float probabilities of shape (rows, classes) for validated inputs."""
        ...


def refuse_code_executing_format(path: Path) -> None:
    """Raise if `path` is a pickle-family file, judged by extension and by content."""
    fmt = _CODE_EXECUTING_SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        with path.open("rb") as f:
            head = f.read(2)
        # Pickle protocol 2+ starts with PROTO (0x80) and a version byte; joblib/numpy-pickle too.
        if len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
            fmt = "pickle"
    if fmt is not None:
        raise ModelLoadError(
            f"{path}: format {fmt!r} refused: its loader executes arbitrary code from the file. "
            "Save the model with skops (runtime 'sklearn') or export it to ONNX (runtime 'onnx')."
        )


def load_runtime(model_dir: Path, manifest: Manifest) -> ModelRuntime:
    path = model_dir / manifest.file
    if not path.is_file():
        raise ModelLoadError(f"{path}: model file not found")
    refuse_code_executing_format(path)
    if manifest.runtime == "onnx":
        from bastion.runtimes.onnx import OnnxRuntime

        return OnnxRuntime.load(path, manifest)
    from bastion.runtimes.sklearn import SkopsRuntime

    return SkopsRuntime.load(path, manifest)
