"""Drift and anomaly detection (bastion.drift) through the real service: demo bundles with their
signed reference data, requests through `Bastion.handle` (every stage, the audit log), and the
background task's `evaluate` called directly so that a window ends when the test says."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy.stats import ks_2samp

from bastion.config import DriftSettings, load_config
from bastion.context import RequestContext
from bastion.demo import DemoBuild, build_demo, infer_request
from bastion.drift import DriftMonitor, Statistics, Transition, _grid, ks_statistic, psi
from bastion.errors import ConfigError
from bastion.routes import ROUTE_ACTIONS, Route
from bastion.service import Bastion

CANCER, DIABETES = "breast-cancer", "diabetes"
_ANCHORS = {
    CANCER: 'path = "bundles/breast-cancer-1"\ntrusted_keys = ["keys/release.pub"]\n',
    DIABETES: "aggregates = true",
    "breast-cancer-skops": 'decryption_key = "file:keys/kek.key"',
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoBuild:
    return build_demo(tmp_path_factory.mktemp("drift") / "demo", llm=False)


def _policy(
    demo: DemoBuild, tables: dict[str, str] | None = None, extra: dict[str, str] | None = None
) -> Path:
    """The demo's policy file with `[models.drift]` tables (and other model settings) added."""
    text = demo.config_path.read_text()
    name = uuid.uuid4().hex[:8]
    text = text.replace('state_dir = "state"', f'state_dir = "state-{name}"')
    for model, anchor in _ANCHORS.items():
        line = text.index(anchor)
        end = text.index("\n", line + len(anchor) - 1) + 1
        added = (extra or {}).get(model, "")
        if tables and model in tables:
            added += f"[models.drift]\n{tables[model]}\n"
        text = text[:end] + added + text[end:]
    path = demo.root / f"policy-{name}.toml"
    path.write_text(text)
    return path


@pytest.fixture
def open_service(demo: DemoBuild) -> Iterator[Callable[..., Bastion]]:
    opened: list[Bastion] = []

    def make(tables: dict[str, str] | None = None, extra: dict[str, str] | None = None) -> Bastion:
        path = _policy(demo, tables, extra)
        service = Bastion(load_config(path), config_path=path)
        opened.append(service)
        return service

    yield make
    for service in opened:
        service.close()


def _run(service: Bastion, calls: Callable[[Bastion, str], Awaitable[Any]]) -> Any:
    async def go() -> Any:
        await service.startup()
        key = service.keys.create(name="drift-admin", roles=["admin"], now=time.time()).secret
        try:
            return await calls(service, f"Bearer {key}")
        finally:
            await service.aclose()

    return asyncio.run(go())


async def _send(service: Bastion, key: str, model: str, rows: np.ndarray, per_request: int = 10) -> list[int]:
    statuses = []
    for i in range(0, len(rows), per_request):
        body = json.dumps(infer_request(rows[i : i + per_request])).encode()

        async def read_body(limit: int, body: bytes = body) -> bytes:
            return body

        ctx = RequestContext(
            request_id=uuid.uuid4().hex,
            action=ROUTE_ACTIONS[Route.INFER],
            now=time.time(),
            credentials=key,
            read_body=read_body,
            client="127.0.0.1",
            model_name=model,
        )
        statuses.append((await service.handle(Route.INFER, ctx)).status)
    return statuses


def _reference(service: Bastion, model: str) -> np.ndarray:
    reference = service.registry.get(model).reference
    assert reference is not None
    return np.asarray(reference["features"])


def _drift_records(service: Bastion) -> list[dict[str, Any]]:
    with sqlite3.connect(service.paths.audit) as db:
        records = [json.loads(b) for (b,) in db.execute("SELECT body FROM records ORDER BY seq")]
    return [r for r in records if r["route"] == "drift"]


def _feature_alerts(transitions: list[Transition]) -> list[tuple[str, bool]]:
    return [(t.feature, t.started) for t in transitions if t.signal == "feature"]


@pytest.mark.parametrize(("model", "column"), [(CANCER, 1), (CANCER, 8), (DIABETES, 2), (DIABETES, 0)])
def test_a_feature_shifted_by_one_standard_deviation_alerts_for_it_alone_within_one_window(
    open_service: Callable[..., Bastion], model: str, column: int
) -> None:
    """Default thresholds and window (500 rows): the demo's own rows, one column moved by its
    standard deviation. Before the window is full nothing is judged; at its end the shifted column
    alone alerts; a window of unshifted rows later it clears. Metric and audit event both say so."""
    service = open_service()

    async def calls(s: Bastion, key: str) -> tuple[list[Transition], ...]:
        reference = _reference(s, model)
        rng = np.random.default_rng(column)
        window = DriftSettings().window_rows
        shifted = reference[rng.choice(len(reference), window, replace=len(reference) < window)].copy()
        shifted[:, column] += reference[:, column].std()
        statuses = await _send(s, key, model, shifted[:-10])
        early = await s.drift.evaluate(time.time(), force=True)
        statuses += await _send(s, key, model, shifted[-10:])
        assert set(statuses) == {200}, statuses
        raised = await s.drift.evaluate(time.time(), force=True)
        back = reference[rng.choice(len(reference), window, replace=len(reference) < window)]
        assert set(await _send(s, key, model, back)) == {200}
        cleared = await s.drift.evaluate(time.time(), force=True)
        return early, raised, cleared

    early, raised, cleared = _run(service, calls)
    name = f"features[{column}]"
    assert _feature_alerts(early) == []
    assert _feature_alerts(raised) == [(name, True)]
    assert _feature_alerts(cleared) == [(name, False)]
    metrics = service.metrics.render().decode()
    version = service.registry.get(model).version
    labels = f'feature="{name}",model="{model}",signal="feature",version="{version}"'
    assert f"bastion_drift_alert{{{labels}}} 0.0" in metrics  # raised, then cleared
    assert (
        f'bastion_drift_alerts_total{{model="{model}",signal="feature",version="{version}"}} 1.0' in metrics
    )
    assert f'bastion_drift_psi{{feature="{name}",model="{model}",version="{version}"}}' in metrics
    records = [r for r in _drift_records(service) if r["reason"] == "feature"]
    assert [(r["decision"], r["feature"], r["model"]) for r in records] == [
        ("alert", name, model),
        ("clear", name, model),
    ]
    # Statistics and thresholds, never a row's value.
    assert re.fullmatch(
        rf"features\[{column}\]: psi \d+\.\d{{3}} \(threshold 0\.2\), ks 0\.\d{{3}} \(threshold 0\.2\) "
        r"over the last 500 rows",
        records[0]["detail"],
    )


@pytest.mark.parametrize("model", [CANCER, DIABETES])
def test_replaying_the_reference_data_raises_nothing(
    open_service: Callable[..., Bastion], model: str
) -> None:
    """Three shuffled passes over the reference data, evaluated every 50 rows: no alert of any
    signal (feature, prediction, out of distribution, errors, latency)."""
    service = open_service()

    async def calls(s: Bastion, key: str) -> list[Transition]:
        reference = _reference(s, model)
        rng = np.random.default_rng(3)
        transitions = []
        for _ in range(3):
            rows = reference[rng.permutation(len(reference))]
            for i in range(0, len(rows), 50):
                assert set(await _send(s, key, model, rows[i : i + 50])) == {200}
                transitions += await s.drift.evaluate(time.time(), force=True)
        return transitions

    assert _run(service, calls) == []
    assert _drift_records(service) == []


@pytest.mark.parametrize(
    ("table", "alerts"),
    [
        ("psi_threshold = 1e9", True),  # KS alone still sees it
        ("ks_threshold = 0.99", True),  # PSI alone still sees it
        ("psi_threshold = 1e9\nks_threshold = 0.99", False),
        ("window_rows = 100", True),  # a smaller window: judged after 100 rows
        ("enabled = false", False),
    ],
)
def test_each_feature_threshold_and_the_window_are_enforced(
    open_service: Callable[..., Bastion], table: str, alerts: bool
) -> None:
    service = open_service({CANCER: table})

    async def calls(s: Bastion, key: str) -> list[Transition]:
        reference = _reference(s, CANCER)
        rows = reference[np.random.default_rng(5).choice(len(reference), 100, replace=False)].copy()
        rows[:, 1] += reference[:, 1].std()
        # 100 rows fill the small window; with the default 500 they do not (then 400 more).
        await _send(s, key, CANCER, rows)
        first = await s.drift.evaluate(time.time(), force=True)
        if "window_rows" in table:
            return first
        assert first == []
        more = reference[np.random.default_rng(6).choice(len(reference), 400, replace=False)].copy()
        more[:, 1] += reference[:, 1].std()
        await _send(s, key, CANCER, more)
        return await s.drift.evaluate(time.time(), force=True)

    found = _feature_alerts(_run(service, calls))
    assert found == ([("features[1]", True)] if alerts else [])


@pytest.mark.parametrize(("table", "alerts"), [("", True), ("prediction_psi_threshold = 1e9", False)])
def test_a_shift_in_the_predicted_classes_alerts(
    open_service: Callable[..., Bastion], table: str, alerts: bool
) -> None:
    """Traffic of one class only (the rows the model itself calls benign): the class shares move."""
    service = open_service({CANCER: table})

    async def calls(s: Bastion, key: str) -> list[Transition]:
        reference = _reference(s, CANCER)
        predicted = s.registry.get(CANCER).runtime.predict({"features": reference}).argmax(axis=1)
        benign = reference[predicted == 1]
        rows = benign[np.random.default_rng(8).choice(len(benign), 500, replace=True)]
        await _send(s, key, CANCER, rows)
        return await s.drift.evaluate(time.time(), force=True)

    found = [t.started for t in _run(service, calls) if t.signal == "prediction"]
    assert found == ([True] if alerts else [])


@pytest.mark.parametrize(
    ("table", "alerts"), [("ood_rate_threshold = 0.2", True), ("ood_rate_threshold = 0.5", False)]
)
def test_out_of_distribution_refusals_alert_past_their_rate(
    open_service: Callable[..., Bastion], table: str, alerts: bool
) -> None:
    """30 requests, 9 of them refused as out of distribution (30%): past a 20% threshold, not a 50% one.
    (Query auditing off: it would quarantine the key after a few refusals.)"""
    service = open_service({CANCER: table}, extra={CANCER: 'extraction_watch = "off"\n'})

    async def calls(s: Bastion, key: str) -> tuple[list[int], list[Transition]]:
        reference = _reference(s, CANCER)
        # Inside every column's bounds, off the data's manifold: a thief's uniform queries.
        low, high = reference.min(axis=0), reference.max(axis=0)
        far = np.random.default_rng(4).uniform(low, high, size=(9, reference.shape[1]))
        statuses = []
        for i in range(30):
            rows = far[i : i + 1] if i < 9 else reference[i : i + 1]
            statuses += await _send(s, key, CANCER, rows)
        return statuses, await s.drift.evaluate(time.time(), force=True)

    statuses, transitions = _run(service, calls)
    assert statuses.count(422) == 9
    assert [(t.signal, t.started) for t in transitions] == ([("out_of_distribution", True)] if alerts else [])
    gauge = service.metrics.drift_ood_rate.labels(CANCER, service.registry.get(CANCER).version)
    assert gauge._value.get() == pytest.approx(0.3)


def _monitor(service: Bastion, **settings: float) -> DriftMonitor:
    return DriftMonitor(service.registry.get(CANCER), DriftSettings.model_validate(settings))


def test_latency_alerts_past_its_factor_over_the_baseline_and_clears(
    open_service: Callable[..., Bastion],
) -> None:
    monitor = _monitor(open_service(), latency_factor=2.0)
    normal = Statistics(requests=50, ood_rate=0.0, error_rate=0.0, latency_p50=0.010)
    for _ in range(3):  # the warm-up windows build the baseline: nothing is judged
        assert monitor.judge(normal) == []
    assert monitor.judge(Statistics(requests=50, error_rate=0.0, latency_p50=0.019)) == []  # 1.9x
    slow = monitor.judge(Statistics(requests=50, error_rate=0.0, latency_p50=0.030))
    assert [(t.signal, t.started) for t in slow] == [("latency", True)]
    assert slow[0].detail.startswith("median latency 30.00 ms is 2.54x its baseline")
    # While it lasts the baseline stays put: a lasting slowdown stays an alert.
    for _ in range(10):
        assert monitor.judge(Statistics(requests=50, error_rate=0.0, latency_p50=0.030)) == []
    back = monitor.judge(normal)
    assert [(t.signal, t.started) for t in back] == [("latency", False)]


def test_errors_alert_past_their_increase_over_the_baseline(open_service: Callable[..., Bastion]) -> None:
    monitor = _monitor(open_service(), error_rate_increase=0.1)
    assert monitor.judge(Statistics(requests=50, error_rate=0.02)) == []
    assert monitor.judge(Statistics(requests=50, error_rate=0.1)) == []  # 0.1 - baseline < 0.1
    failing = monitor.judge(Statistics(requests=50, error_rate=0.5))
    assert [(t.signal, t.started) for t in failing] == [("errors", True)]
    assert monitor.judge(Statistics(requests=50, error_rate=0.5)) == []  # still on, not repeated


def test_model_failures_count_as_errors_and_client_refusals_do_not(
    open_service: Callable[..., Bastion],
) -> None:
    """Through the service: 20 answered requests, 5 refused for the client's fault (wrong input
    name: 422), none failed. Then the window's error rate is 0 and its OOD rate 0."""
    service = open_service()

    async def calls(s: Bastion, key: str) -> list[Transition]:
        reference = _reference(s, CANCER)
        await _send(s, key, CANCER, reference[:20], per_request=1)
        bad = json.dumps({"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [1]}]})
        for _ in range(5):

            async def read_body(limit: int) -> bytes:
                return bad.encode()

            ctx = RequestContext(
                request_id=uuid.uuid4().hex,
                action=ROUTE_ACTIONS[Route.INFER],
                now=time.time(),
                credentials=key,
                read_body=read_body,
                model_name=CANCER,
            )
            assert (await s.handle(Route.INFER, ctx)).status == 422
        return await s.drift.evaluate(time.time(), force=True)

    assert _run(service, calls) == []
    version = service.registry.get(CANCER).version
    assert service.metrics.drift_error_rate.labels(CANCER, version)._value.get() == 0.0
    assert service.metrics.drift_ood_rate.labels(CANCER, version)._value.get() == 0.0


def test_the_interval_spaces_evaluations(open_service: Callable[..., Bastion]) -> None:
    service = open_service({CANCER: "interval_seconds = 60\nwindow_rows = 50"})

    async def calls(s: Bastion, key: str) -> list[int]:
        reference = _reference(s, CANCER)
        evaluated = []
        for t in (1000.0, 1030.0, 1061.0):
            await _send(s, key, CANCER, reference[:50])
            before = s.drift.monitors[id(s.registry.get(CANCER))].last_evaluated
            await s.drift.evaluate(t)
            evaluated.append(int(s.drift.monitors[id(s.registry.get(CANCER))].last_evaluated != before))
        return evaluated

    assert _run(service, calls) == [1, 0, 1]


def test_the_request_path_only_copies_rows_into_a_bounded_buffer(
    open_service: Callable[..., Bastion],
) -> None:
    """A batch larger than the window keeps its last rows; the buffer never grows."""
    service = open_service({CANCER: "window_rows = 50"})

    async def calls(s: Bastion, key: str) -> DriftMonitor:
        reference = _reference(s, CANCER)
        await _send(s, key, CANCER, reference[:120], per_request=120)
        await _send(s, key, CANCER, reference[120:150], per_request=30)
        return s.drift.monitors[id(s.registry.get(CANCER))]

    monitor = _run(service, calls)
    window = monitor.snapshot()
    assert window.rows is not None and window.rows.shape == (50, 30)
    np.testing.assert_array_equal(window.rows, _reference(service, CANCER)[100:150])


def test_psi_is_zero_for_the_same_shares_and_grows_with_the_shift() -> None:
    expected = np.full(10, 0.1)
    assert psi(expected, np.full(10, 50)) == pytest.approx(0.0, abs=1e-12)
    small = psi(expected, np.array([60, 40] + [50] * 8))
    large = psi(expected, np.array([200, 0] + [50] * 8))
    assert 0 < small < large


def test_the_ks_statistic_is_scipys_and_ignores_rounding_below_the_references_resolution() -> None:
    rng = np.random.default_rng(0)
    reference, window = rng.normal(size=569), rng.normal(0.3, 1, size=500)
    grid = _grid(reference)
    cdf = np.searchsorted(np.sort(reference), grid, side="right") / len(reference)
    assert ks_statistic(window, grid, cdf) == pytest.approx(ks_2samp(window, reference).statistic, abs=0.01)
    # A discrete column sent rounded (the demo's 6 decimals): scipy sees a shift, the grid none.
    levels = np.array([-0.0025919, 0.0343088, 0.0712099])
    discrete = levels[rng.integers(0, 3, size=442)]
    rounded = np.round(discrete[:300], 6)
    grid, cdf = _grid(discrete), np.searchsorted(np.sort(discrete), _grid(discrete), "right") / 442
    assert ks_2samp(rounded, discrete).statistic > 0.2
    assert ks_statistic(rounded, grid, cdf) < 0.1


def test_a_drift_table_on_a_model_without_reference_data_is_refused(demo: DemoBuild) -> None:
    path = _policy(demo, {"breast-cancer-skops": "psi_threshold = 0.3"})
    with pytest.raises(
        ConfigError, match=r"models\.1\.drift: the bundle of 'breast-cancer-skops' carries no"
    ):
        Bastion(load_config(path), config_path=path)


@pytest.mark.parametrize(
    ("model_text", "message"),
    [
        ("[models.drift]\nenabled = false\nwindow_rows = 100\n", "window_rows applies to drift detection"),
        (
            'out_of_distribution = "off"\n[models.drift]\nood_rate_threshold = 0.1\n',
            'drift.ood_rate_threshold is used only when out_of_distribution = "refuse"',
        ),
    ],
)
def test_drift_settings_that_would_be_ignored_are_refused(
    tmp_path: Path, model_text: str, message: str
) -> None:
    path = tmp_path / "p.toml"
    path.write_text(f'[[models]]\npath = "m"\n{model_text}')
    with pytest.raises(ConfigError, match=message):
        load_config(path)
