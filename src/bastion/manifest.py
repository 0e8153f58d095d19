"""The model manifest: the single source of a model's input schema and outputs.

A model directory holds the model file and `manifest.json`. The input guard, the
metadata endpoint and the runtime's own signature check all read from here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from bastion.errors import ModelLoadError

MANIFEST_NAME = "manifest.json"

# Open Inference Protocol V2 tensor datatypes that map onto numpy.
V2_TO_NUMPY: dict[str, np.dtype[np.generic]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
V2Datatype = Literal[
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"
]
Runtime = Literal["onnx", "sklearn"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=128)]
    datatype: V2Datatype
    # -1 marks a variable dimension; the first one is the batch (rows) dimension.
    shape: list[int] = Field(min_length=1)
    # Scalar bounds apply to every element; a list gives one bound per column (last dimension).
    min: float | list[float] | None = None
    max: float | list[float] | None = None
    categories: list[float] | None = None
    sensitive: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> InputSpec:
        if any(d == 0 or d < -1 for d in self.shape):
            raise ValueError("shape dimensions must be positive or -1")
        cols = self.shape[-1]
        for bound_name in ("min", "max"):
            bound = getattr(self, bound_name)
            if isinstance(bound, list) and (cols == -1 or len(bound) != cols):
                raise ValueError(f"{bound_name} has {len(bound)} entries but the last dimension is {cols}")
        if self.categories is not None and (self.min is not None or self.max is not None):
            raise ValueError("give either categories or min/max, not both")
        return self

    @property
    def numpy_dtype(self) -> np.dtype[np.generic]:
        return V2_TO_NUMPY[self.datatype]


class OutputSpec(_Strict):
    """A classifier names its classes; a regressor declares the range of its prediction.

    The range is a promise the packager makes about the model: answers under a DP policy are
    clamped to it, and the noise is calibrated to its width (one row moves a value by at most
    max - min).
    """

    classes: list[str] | None = Field(default=None, min_length=2)
    value_range: tuple[float, float] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> OutputSpec:
        if (self.classes is None) == (self.value_range is None):
            raise ValueError("give either classes (a classifier) or value_range (a regressor)")
        if self.value_range is not None:
            low, high = self.value_range
            if not (math.isfinite(low) and math.isfinite(high) and low < high):
                raise ValueError("value_range must be two finite numbers [min, max] with min < max")
        return self

    @property
    def is_regression(self) -> bool:
        return self.value_range is not None

    @property
    def width(self) -> int:
        """Columns of the model's raw output: one probability per class, or one value."""
        return 1 if self.classes is None else len(self.classes)


class Manifest(_Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
    version: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")]
    runtime: Runtime
    file: Annotated[str, Field(min_length=1)]
    inputs: list[InputSpec] = Field(min_length=1)
    outputs: OutputSpec
    description: str = ""
    # skops: types beyond skops' defaults that this model needs and the packager vouches for.
    trusted_types: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_inputs(self) -> Manifest:
        names = [i.name for i in self.inputs]
        if len(set(names)) != len(names):
            raise ValueError("input names must be unique")
        if "/" in self.file or "\\" in self.file or self.file.startswith("."):
            raise ValueError("file must be a plain file name inside the model directory")
        return self

    def input(self, name: str) -> InputSpec | None:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        return None


def read_manifest(model_dir: Path) -> Manifest:
    path = model_dir / MANIFEST_NAME
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: manifest not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: cannot read manifest: {e}") from None
    try:
        return Manifest.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ModelLoadError(f"{path}: {field}: {first['msg']}") from None


def write_manifest(model_dir: Path, manifest: Manifest) -> Path:
    path = model_dir / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(manifest.model_dump_json(indent=2, exclude_defaults=True) + "\n", encoding="utf-8")
    tmp.replace(path)  # never a half-written manifest
    return path
