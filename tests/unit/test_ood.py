"""Out-of-distribution screening from the model thief's side: queries drawn inside the manifest's
bounds but off the data are refused; real rows, and real rows with small noise, are not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bastion.config import ModelRef
from bastion.ood import DistributionScreen
from bastion.registry import ModelRegistry
from tests.helpers import write_test_deployment


def _data() -> np.ndarray:
    from sklearn.datasets import load_breast_cancer

    return np.asarray(load_breast_cancer().data, dtype=np.float32)


def test_extraction_queries_inside_the_bounds_are_refused_and_real_rows_are_not() -> None:
    x = _data()
    screen = DistributionScreen(x)
    rng = np.random.default_rng(0)
    uniform = rng.uniform(x.min(axis=0), x.max(axis=0), size=(2000, x.shape[1]))  # inside every bound
    noisy = x * (1 + rng.normal(0, 0.02, size=x.shape))
    assert (screen.distances(uniform) > screen.limit).mean() == 1.0
    assert (screen.distances(x) > screen.limit).sum() == 0
    assert (screen.distances(noisy) > screen.limit).sum() == 0
    # One column moved off its correlated partners (radius against perimeter and area): refused.
    odd = x[:1].copy()
    odd[0, 0] = 10.0
    assert screen.first_outlier({"f": odd}, ["f"]) == 0
    assert screen.first_outlier({"f": x[:5]}, ["f"]) is None


def test_inputs_are_screened_as_one_row_in_manifest_order() -> None:
    x = _data()
    screen = DistributionScreen.for_inputs({"a": x[:, :10], "b": x[:, 10:]}, ["a", "b"])
    rows = {"b": x[:3, 10:], "a": x[:3, :10]}
    np.testing.assert_allclose(screen.distances(x[:3]), DistributionScreen(x).distances(x[:3]))
    assert screen.first_outlier(rows, ["a", "b"]) is None


def test_too_little_reference_data_is_refused_at_load() -> None:
    with pytest.raises(ValueError, match="cannot describe"):
        DistributionScreen(_data()[:40])


def test_the_screen_is_on_by_default_and_can_be_turned_off(tmp_path: Path) -> None:
    write_test_deployment(tmp_path)
    bundle, key = tmp_path / "bundles" / "breast-cancer-1", tmp_path / "keys" / "release.pub"
    on = ModelRegistry.load([ModelRef(path=bundle, trusted_keys=[key])]).get("breast-cancer")
    off = ModelRegistry.load([ModelRef(path=bundle, trusted_keys=[key], out_of_distribution="off")])
    assert on.screen is not None and off.get("breast-cancer").screen is None
    assert on.monitor is not None and on.extraction_watch == "quarantine"
    assert off.get("breast-cancer").monitor is not None  # query auditing whitens with its own screen
    unwatched = ModelRegistry.load([ModelRef(path=bundle, trusted_keys=[key], extraction_watch="off")])
    assert unwatched.get("breast-cancer").monitor is None


def test_a_reference_set_too_small_to_screen_refuses_the_model_and_says_how_to_fix_it(tmp_path: Path) -> None:
    from bastion.bundle.pack import pack
    from bastion.bundle.signing import sign_bundle

    _, build = write_test_deployment(tmp_path)
    bundle = tmp_path / "bundles" / "small-reference"
    pack(tmp_path / "models" / "breast-cancer", bundle, reference_data={"features": _data()[:20]})
    sign_bundle(bundle, build.signing_key, build.passphrase)
    ref = ModelRef(path=bundle, trusted_keys=[tmp_path / "keys" / "release.pub"])
    registry = ModelRegistry.load([ref])
    assert not registry.models()
    (reason,) = registry.failures.values()
    assert "cannot screen inputs" in reason and 'out_of_distribution = "off"' in reason
    assert 'extraction_watch = "off"' in reason
    assert not ModelRegistry.load([ref.model_copy(update={"out_of_distribution": "off"})]).models()
    both_off = {"out_of_distribution": "off", "extraction_watch": "off"}
    assert ModelRegistry.load([ref.model_copy(update=both_off)]).models()
