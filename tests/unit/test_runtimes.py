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


# -- the trusted-pickle scanner: named globals only --------------------------------------------

DANGEROUS = [
    ("numpy.testing._private.utils", "runstring"),  # exec
    ("numpy.testing", "runstring"),
    ("numpy.f2py", "run_main"),
    ("numpy.f2py.f2py2e", "run_main"),
    ("numpy.f2py.crackfortran", "crackfortran"),
    ("numpy", "load"),  # with allow_pickle, a second pickle from any path
    ("numpy", "save"),  # writes files
    ("numpy", "fromfile"),
    ("numpy.core", "_ufunc_reconstruct"),  # __import__ + getattr of any name
    ("numpy._core", "_ufunc_reconstruct"),
    ("numpy.ctypeslib", "load_library"),
    ("numpy.lib.npyio", "load"),
    ("builtins", "eval"),
    ("builtins", "exec"),
    ("builtins", "compile"),
    ("builtins", "getattr"),
    ("builtins", "setattr"),
    ("builtins", "__import__"),
    ("builtins", "open"),
    ("builtins", "breakpoint"),
    ("__builtin__", "eval"),  # protocols 0-2 rename it to builtins.eval
    ("os", "system"),
    ("os", "execv"),
    ("posix", "system"),
    ("nt", "system"),
    ("subprocess", "Popen"),
    ("subprocess", "getoutput"),
    ("commands", "getoutput"),  # renamed to subprocess.getoutput by protocols 0-2
    ("pickle", "loads"),
    ("_pickle", "loads"),
    ("importlib", "import_module"),
    ("runpy", "_run_code"),
    ("runpy", "run_path"),
    ("code", "InteractiveInterpreter"),
    ("sys", "modules"),
    ("operator", "attrgetter"),
    ("operator", "methodcaller"),
    ("functools", "partial"),
    ("shutil", "rmtree"),
    ("webbrowser", "open"),
    ("ctypes", "CDLL"),
    ("joblib", "load"),
    ("scipy.io", "loadmat"),
    ("sklearn.utils", "all_estimators"),  # a function of an allowed library is not an estimator
    ("sklearn.utils._testing", "assert_run_python_script_without_output"),  # runs Python code
    ("collections", "namedtuple"),
    ("copyreg", "add_extension"),
    ("_codecs", "decode"),
]


def _short(text: str) -> bytes:
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw  # SHORT_BINUNICODE


def _carriers(module: str, name: str) -> dict[str, bytes]:
    """The same global reached by each opcode that imports, and by tricks to hide it from a scanner."""
    line = f"{module}\n{name}\n".encode()
    return {
        "GLOBAL": b"c" + line + b"(tR.",
        "INST": b"(i" + line + b".",
        "STACK_GLOBAL": b"\x80\x04" + _short(module) + _short(name) + b"\x93)R.",
        # Strings an allowed global would use, pushed and popped after the real ones.
        "STACK_GLOBAL after POP": b"\x80\x04"
        + _short(module)
        + _short(name)
        + _short("numpy")
        + _short("ndarray")
        + b"00\x93)R.",
        # The real strings memoised, then fetched back with an allowed pair in between.
        "STACK_GLOBAL from memo": b"\x80\x04"
        + _short(module)
        + b"\x94"
        + _short(name)
        + b"\x94"
        + _short("numpy")
        + _short("ndarray")
        + b"00h\x00h\x01\x93)R.",
        # The module name built at load time by an allowed function (rot13 of a string).
        "STACK_GLOBAL built": b"\x80\x04"
        + b"\x8c\x07_codecs\x8c\x06encode\x93"
        + _short(module.translate(_ROT13))
        + _short("rot13")
        + b"\x86R"
        + _short(name)
        + b"\x93)R.",
    }


_ROT13 = str.maketrans(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "nopqrstuvwxyzabcdefghijklmNOPQRSTUVWXYZABCDEFGHIJKLM",
)


@pytest.mark.parametrize(("module", "name"), DANGEROUS, ids=[f"{m}.{n}" for m, n in DANGEROUS])
def test_the_pickle_scan_refuses_dangerous_callables_by_every_route(module: str, name: str) -> None:
    from bastion.runtimes.picklescan import scan_pickle

    for carrier, data in _carriers(module, name).items():
        with pytest.raises(ModelLoadError, match="pickle refused") as err:
            scan_pickle(Path("model.pkl"), data)
        assert "model.pkl" in str(err.value), carrier


def test_the_pickle_scan_refuses_import_registries_and_hooks() -> None:
    from bastion.runtimes.picklescan import scan_pickle

    for data in (b"\x80\x02\x82\x01)R.", b"\x80\x02Pid\n.", b"\x80\x02X\x01\x00\x00\x00aQ."):
        with pytest.raises(ModelLoadError, match="pickle refused"):
            scan_pickle(Path("model.pkl"), data)


def test_the_pickle_scan_passes_real_scikit_learn_models() -> None:
    import warnings

    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer, OneHotEncoder, StandardScaler

    from bastion.demo import _train, train_regressor
    from bastion.runtimes.picklescan import scan_pickle

    classifier, x, _ = _train()  # the demo's own models
    regressor, _ = train_regressor()
    y = classifier.predict(x)
    others = [
        RandomForestClassifier(n_estimators=3, random_state=np.random.RandomState(0)),
        HistGradientBoostingClassifier(max_iter=3),
        KNeighborsClassifier(algorithm="kd_tree"),
        MLPClassifier(max_iter=3),
        make_pipeline(FunctionTransformer(np.log1p), LogisticRegression()),
        make_pipeline(
            ColumnTransformer(
                [("s", StandardScaler(), [0, 1]), ("o", OneHotEncoder(handle_unknown="ignore"), [2])]
            ),
            LogisticRegression(),
        ),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fitted = [classifier, regressor, *(m.fit(np.abs(x), y) for m in others)]
    assert isinstance(fitted[1], Ridge)
    for model in fitted:
        for protocol in (2, 4, 5):
            scan_pickle(Path("model.pkl"), pickle.dumps(model, protocol=protocol))
