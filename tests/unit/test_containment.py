"""The containment ladder's mechanism: the steps by rung, timed measures that end by themselves or
when an operator releases the key, and the policy file's rules for the ladder's settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from bastion.config import ModelRef
from bastion.containment import ContainmentPolicy, MeasureStore


def test_each_incident_climbs_one_rung_and_the_last_repeats() -> None:
    policy = ContainmentPolicy(("throttle", "degrade", "quarantine"))
    assert [policy.step(n) for n in range(5)] == [
        "throttle",
        "degrade",
        "quarantine",
        "quarantine",
        "quarantine",
    ]
    ref = ModelRef(
        path=Path("m"), containment=["degrade", "isolate"], degrade_to="top_k", containment_seconds=60
    )
    assert ref.ladder == ("degrade", "isolate")
    assert ModelRef(path=Path("m")).ladder == ("quarantine",)  # extraction_watch's default
    assert ModelRef(path=Path("m"), extraction_watch="alert").ladder == ("record",)


def test_timed_measures_end_by_themselves_and_on_release(tmp_path: Path) -> None:
    store = MeasureStore(tmp_path / "containment.db")
    store.apply("key:a", "m", "throttle", value="0.5", now=100.0, until=160.0)  # containment_seconds = 60
    store.apply("key:a", "m", "degrade", value="label", now=100.0, until=160.0)
    store.apply("key:b", "m", "reroute", value=None, now=100.0, until=1000.0)
    now_a = store.active("key:a", "m", now=159.0)
    assert (now_a.throttle_rate, now_a.degrade_to, now_a.reroute) == (0.5, "label", False)
    assert not store.active("key:a", "m", now=160.0)  # over: nothing in force
    assert not store.active("key:a", "other-model", now=120.0)  # per model
    other = MeasureStore(tmp_path / "containment.db")  # another worker or the CLI sees the same
    assert other.release("key:b") == 1
    assert not store.active("key:b", "m", now=200.0)
    assert store.active("key:a", "m", now=120.0)
    other.close()
    store.close()


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"containment": ["record"], "extraction_watch": "off"}, "never be climbed"),
        ({"containment": ["record"], "extraction_watch": "alert"}, "set one"),
        ({"throttle_rate": 2.0}, 'used only by a "throttle" step'),
        ({"containment": ["quarantine"], "degrade_to": "top_k"}, 'used only by a "degrade" step'),
        ({"containment": ["quarantine", "isolate"], "containment_seconds": 5}, "none is set"),
    ],
)
def test_a_ladder_setting_that_would_be_ignored_is_refused(fields: dict[str, object], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        ModelRef(path=Path("m"), **fields)  # type: ignore[arg-type]


def test_a_ladder_on_a_model_without_reference_data_is_refused_at_load(tmp_path: Path) -> None:
    # Found by the operations red team: `containment = ["isolate"]` on the demo's skops classifier
    # (no reference data, so no query auditing) was accepted and never acted.
    from bastion.config import load_config
    from bastion.demo import build_demo
    from bastion.registry import ModelRegistry

    demo = build_demo(tmp_path / "demo", llm=False)
    text = demo.config_path.read_text()
    anchor = 'decryption_key = "file:keys/kek.key"'
    for setting in ('containment = ["isolate"]', "isolate_after = 2"):
        demo.config_path.write_text(text.replace(anchor, f"{anchor}\n{setting}", 1))
        registry = ModelRegistry.load(list(load_config(demo.config_path).models))
        [(path, reason)] = registry.failures.items()
        assert "breast-cancer-skops" in path and "reference data" in reason
        assert {m.name for m in registry.models()} == {"breast-cancer", "diabetes"}  # the others serve


def test_a_degrade_step_on_a_regressor_is_refused_at_load(tmp_path: Path) -> None:
    """Red team of issue 12, second pass, F10: `degrade` on a regressor was accepted; a degraded
    principal then got 403 policy_not_applicable on every request (a block, not a lowered answer),
    since label and top_k are made for classes."""
    from bastion.config import load_config
    from bastion.demo import build_demo
    from bastion.registry import ModelRegistry

    demo = build_demo(tmp_path / "demo", llm=False)
    text = demo.config_path.read_text()
    anchor = 'path = "bundles/diabetes-1"             # a regressor: one value per row'
    assert anchor in text
    demo.config_path.write_text(text.replace(anchor, f'{anchor}\ncontainment = ["throttle", "degrade"]', 1))
    registry = ModelRegistry.load(list(load_config(demo.config_path).models))
    [(path, reason)] = registry.failures.items()
    assert "diabetes" in path and "degrade" in reason and "regressor" in reason
    assert {m.name for m in registry.models()} == {"breast-cancer", "breast-cancer-skops"}
