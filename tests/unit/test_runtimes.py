"""Model loading from the supply-chain attacker's side: code-executing formats never load."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from bastion.config import ModelRef
from bastion.errors import ModelLoadError
from bastion.manifest import read_manifest
from bastion.registry import ModelRegistry
from bastion.runtimes import load_runtime
from tests.helpers import write_test_deployment

MARKER = Path("/tmp/bastion-pickle-payload-ran")


class _Payload:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (MARKER.touch, ())


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    write_test_deployment(root)
    return root / "models"


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize("suffix", [".pkl", ".joblib", ".onnx", ".skops"])
def test_pickle_is_refused_by_extension_and_by_content(models: Path, tmp_path: Path, suffix: str) -> None:
    MARKER.unlink(missing_ok=True)
    model_dir = _copy(models / "breast-cancer-skops", tmp_path / "m")
    manifest = json.loads((model_dir / "manifest.json").read_text())
    manifest["file"] = "model" + suffix
    (model_dir / "manifest.json").write_text(json.dumps(manifest))
    (model_dir / ("model" + suffix)).write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(ModelLoadError) as err:
        load_runtime(model_dir, read_manifest(model_dir))
    assert str(model_dir / ("model" + suffix)) in str(err.value)
    assert "pickle" in str(err.value) or "joblib" in str(err.value)
    assert "executes arbitrary code" in str(err.value)
    assert not MARKER.exists(), "the pickle payload ran"


def test_skops_file_with_unvouched_types_is_refused(models: Path, tmp_path: Path) -> None:
    import os

    import skops.io as sio
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer

    model_dir = _copy(models / "breast-cancer-skops", tmp_path / "m")
    # A model whose preprocessing would call os.system on its input.
    sio.dump(
        make_pipeline(FunctionTransformer(func=os.system), LogisticRegression()), model_dir / "model.skops"
    )
    with pytest.raises(ModelLoadError, match=r"types nobody vouched for: posix\.system"):
        load_runtime(model_dir, read_manifest(model_dir))


def test_manifest_that_disagrees_with_the_model_is_refused(models: Path, tmp_path: Path) -> None:
    model_dir = _copy(models / "breast-cancer", tmp_path / "m")
    manifest = json.loads((model_dir / "manifest.json").read_text())
    manifest["inputs"][0]["shape"] = [-1, 29]
    manifest["inputs"][0]["min"] = manifest["inputs"][0]["min"][:29]
    manifest["inputs"][0]["max"] = manifest["inputs"][0]["max"][:29]
    (model_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError, match="shape"):
        load_runtime(model_dir, read_manifest(model_dir))


def test_bad_manifest_names_file_and_field(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps({"name": "x", "version": "1", "runtime": "torch"}))
    with pytest.raises(ModelLoadError) as err:
        read_manifest(tmp_path)
    assert str(tmp_path / "manifest.json") in str(err.value) and "runtime" in str(err.value)


@pytest.mark.parametrize(
    ("outputs", "message"),
    [
        ({}, "either classes (a classifier) or value_range (a regressor)"),
        ({"classes": ["a", "b"], "value_range": [0, 1]}, "either classes"),
        ({"value_range": [5, 5]}, "min < max"),
        ({"value_range": [0, float("inf")]}, "finite"),
    ],
)
def test_a_manifest_declares_classes_or_a_finite_range(tmp_path: Path, outputs: dict, message: str) -> None:
    manifest = {
        "name": "m",
        "version": "1",
        "runtime": "sklearn",
        "file": "model.skops",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}],
        "outputs": outputs,
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError) as err:
        read_manifest(tmp_path)
    assert str(tmp_path / "manifest.json") in str(err.value) and "outputs" in str(err.value)
    assert message in str(err.value)


def _declaring(models: Path, name: str, dst: Path, outputs: dict[str, object]) -> Path:
    """A copy of a model directory whose manifest declares other outputs."""
    model_dir = _copy(models / name, dst)
    manifest = json.loads((model_dir / "manifest.json").read_text())
    manifest["outputs"] = outputs
    (model_dir / "manifest.json").write_text(json.dumps(manifest))
    return model_dir


def test_regressor_and_classifier_must_match_what_the_manifest_declares(models: Path, tmp_path: Path) -> None:
    regressor = models / "diabetes"
    assert read_manifest(regressor).outputs.value_range == (0.0, 400.0)
    values = load_runtime(regressor, read_manifest(regressor)).predict(
        {"features": np.zeros((3, 10), dtype=np.float32)}
    )
    assert values.shape == (3, 1)
    refused = [
        (_declaring(models, "diabetes", tmp_path / "r", {"classes": ["low", "high"]}), "no predict_proba"),
        (
            _declaring(models, "breast-cancer-skops", tmp_path / "c", {"value_range": [0, 1]}),
            "declares a regressor",
        ),
        (
            _declaring(models, "breast-cancer", tmp_path / "o", {"value_range": [0, 1]}),
            "has 2 columns but the manifest declares 1",
        ),
    ]
    for model_dir, message in refused:
        with pytest.raises(ModelLoadError, match=message):
            load_runtime(model_dir, read_manifest(model_dir))


def test_one_bad_model_is_refused_and_the_others_serve(models: Path, tmp_path: Path) -> None:
    bad = _copy(models / "breast-cancer", tmp_path / "bad")
    (bad / "model.onnx").write_bytes(b"not a model")
    refs = [
        ModelRef(path=models / "breast-cancer-skops", unsafe_unsigned=True),
        ModelRef(path=bad, unsafe_unsigned=True),
    ]
    registry = ModelRegistry.load(refs)
    assert registry.names == {"breast-cancer-skops"}
    assert "not a loadable ONNX model" in registry.failures[str(bad)]


def test_digest_changes_with_one_flipped_byte(models: Path, tmp_path: Path) -> None:
    from bastion.registry import artifact_digest

    model_dir = _copy(models / "breast-cancer", tmp_path / "m")
    manifest = read_manifest(model_dir)
    before = artifact_digest(model_dir, manifest)
    data = bytearray((model_dir / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (model_dir / "model.onnx").write_bytes(bytes(data))
    assert artifact_digest(model_dir, manifest) != before
