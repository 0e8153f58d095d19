"""Drift and anomaly detection against the reference data signed into each bundle.

Per served model version with reference data, five signals:

- **feature**: per input column, the population stability index (PSI) and the two-sample
  Kolmogorov–Smirnov statistic between the last `window_rows` served rows (a sliding window) and
  the reference data. PSI bins are the reference's deciles (ties merged); both sides' bin shares
  are smoothed by half a row, so an empty bin costs a finite amount. PSI as in Siddiqi, *Credit
  Risk Scorecards* (2006), ch. 8. KS is the statistic only (a threshold on the effect size, so the
  alarm rate does not grow with traffic), on the reference's own grid (`ks_statistic`): bin edges
  and KS points sit between the reference's distinct values, so a client rounding a discrete
  column's values (the demo's requests carry 6 decimals) moves nothing.
- **prediction**: the PSI of the window's predictions against the model's own predictions on the
  reference data: class shares (argmax) for a classifier, the value's deciles for a regressor.
- **out_of_distribution**: the share of requests the input guard refused as out of distribution.
- **latency**: the median latency of the answered requests against an exponentially weighted
  baseline of the previous windows' medians (alert past `latency_factor` times it, and at least
  `_LATENCY_FLOOR` above it). The median, not a tail: on this project's two shared cores the p95
  of 20-request windows crossed three times its baseline with the neighbours' load alone.
- **errors**: the share of requests that failed on the server's side (5xx but deliberate refusals)
  against an exponentially weighted baseline (alert past it plus `error_rate_increase`).

The three rates are judged per evaluation (tumbling: the requests since the previous one), once at
least `_MIN_REQUESTS` requests have come (until then they accumulate). A baseline stops following
while its alert is active: a lasting failure stays an alert rather than becoming the norm.

Off the hot path: a request only copies its admitted rows and its predictions into preallocated
ring buffers and bumps counters (`DriftMonitor.observe`, on the event loop); a background task
(`DriftWatch.evaluate`) snapshots the buffers on the loop, computes the statistics in a worker
thread, and publishes gauges and, when an alert starts or clears, an audit event. No row value
reaches a metric or a record: statistics only, labelled by the manifest's own input names.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bastion.config import Action, Config, DriftSettings
from bastion.context import RequestContext
from bastion.errors import ConfigError, ErrorCode
from bastion.metrics import Metrics
from bastion.ood import input_rows
from bastion.registry import ModelRegistry, ServedModel

log = logging.getLogger("bastion.drift")

_BINS = 10  # reference deciles: the common PSI binning
_MAX_REFERENCE_ROWS = 10_000  # a larger reference set is sampled (fixed seed): KS and PSI as good, faster
_MIN_REQUESTS = 20  # a rate over fewer requests says little: they accumulate into the next window
_BASELINE_WEIGHT = 0.2  # the EWMA's weight on the newest window
_WARMUP_WINDOWS = 3  # latency windows seen before its baseline is trusted
_CLEAR = 0.8  # an alert clears below 80% of its threshold: a value hovering at it does not flap
_LATENCY_FLOOR = 0.002  # s: a rise smaller than this is scheduling noise, not an anomaly
_MAX_LATENCIES = 10_000  # per window; more requests than this in one window keep the newest
# Refusals the server chose (containment, load shedding), not failures.
_DELIBERATE = frozenset(
    {ErrorCode.MODEL_ISOLATED, ErrorCode.OVERLOADED, ErrorCode.ROUTE_DISABLED, ErrorCode.MODEL_BUSY}
)
_OOD = ErrorCode.OUT_OF_DISTRIBUTION.value


def feature_names(model: ServedModel) -> list[str]:
    """One name per input column, from the manifest: `name` for a one-column input, else `name[j]`."""
    assert model.reference is not None
    names = []
    for spec in model.manifest.inputs:
        array = model.reference[spec.name]
        columns = math.prod(array.shape[1:])
        names.extend([spec.name] if columns == 1 else [f"{spec.name}[{j}]" for j in range(columns)])
    return names


def _grid(values: np.ndarray) -> np.ndarray:
    """The points between the reference's distinct values (and one below, one at the top): where a
    column's distribution functions are compared. Between values, not on them: a client's rounding
    (0.0345 sent for 0.03450001) never moves a row across a bin edge."""
    distinct = np.unique(values)
    between = (distinct[:-1] + distinct[1:]) / 2
    # Outside the range by half the finest gap, or by a millionth of the values' scale: a value sent
    # rounded at the extremes stays on its side of the end points.
    scale = 1e-6 * max(1.0, float(np.abs(distinct).max()))
    pad = max(scale, float(np.diff(distinct).min()) / 2) if len(distinct) > 1 else scale
    return np.concatenate([[distinct[0] - pad], between, [distinct[-1] + pad]])


def _cuts(values: np.ndarray) -> np.ndarray:
    """Interior PSI bin edges near the deciles, each moved up to the next gap between distinct
    reference values; equal edges (a discrete column) merged."""
    distinct = np.unique(values)
    between = (distinct[:-1] + distinct[1:]) / 2
    below = np.searchsorted(distinct, np.quantile(values, np.linspace(0, 1, _BINS + 1)[1:-1]), "right") - 1
    return np.unique(between[below[below < len(between)]])


def ks_statistic(window: np.ndarray, grid: np.ndarray, reference_cdf: np.ndarray) -> float:
    """The two-sample Kolmogorov-Smirnov statistic sup |F_window - F_reference|, taken on the
    reference's `_grid` (`reference_cdf`: its distribution function there). Equal to
    `scipy.stats.ks_2samp`'s for continuous data up to the window's mass inside one gap between
    neighbouring reference values; unlike it, blind to rounding below the reference's resolution."""
    cdf = np.searchsorted(np.sort(window), grid, side="right") / len(window)
    return float(np.abs(cdf - reference_cdf).max())


def _shares(counts: np.ndarray) -> np.ndarray:
    return np.asarray((counts + 0.5) / (counts.sum() + 0.5 * len(counts)))


def psi(expected: np.ndarray, counts: np.ndarray) -> float:
    """Population stability index of observed bin `counts` against `expected` shares (smoothed,
    positive): sum over bins of (o - e) ln(o / e). 0: the same; above 0.25 is the textbook
    "significant shift"."""
    observed = _shares(counts)
    return float(np.sum((observed - expected) * np.log(observed / expected)))


@dataclass(frozen=True, slots=True)
class _Window:
    """A snapshot of one monitor's buffers, taken on the event loop; computed on in a thread."""

    rows: np.ndarray | None  # (window_rows, columns), oldest first; None: not a full new window
    predictions: np.ndarray | None  # (window_rows, outputs)
    requests: int  # requests judged for the rates (0: too few, not judged this time)
    refused: int
    failed: int
    latencies: np.ndarray


@dataclass(frozen=True, slots=True)
class Statistics:
    """What one evaluation measured. Arrays are per feature, in `DriftMonitor.features` order."""

    psi: np.ndarray | None = None
    ks: np.ndarray | None = None
    prediction_psi: float | None = None
    requests: int = 0
    ood_rate: float | None = None
    error_rate: float | None = None
    latency_p50: float | None = None


@dataclass(frozen=True, slots=True)
class Transition:
    """An alert that started (`started`) or cleared: what the audit event and the alert metric say."""

    signal: str  # feature | prediction | out_of_distribution | latency | errors
    feature: str  # the manifest's column name for "feature", else ""
    started: bool
    detail: str


@dataclass(slots=True)
class _Baseline:
    value: float | None = None
    windows: int = 0

    def update(self, x: float) -> None:
        self.value = x if self.value is None else (1 - _BASELINE_WEIGHT) * self.value + _BASELINE_WEIGHT * x
        self.windows += 1


class DriftMonitor:
    """One model version's reference statistics, ring buffers and alert state. Fed and read on the
    event loop only (the statistics run in a thread on a snapshot), so it takes no lock."""

    def __init__(self, model: ServedModel, settings: DriftSettings) -> None:
        assert model.reference is not None
        self.model = model
        self.settings = settings
        names = [s.name for s in model.manifest.inputs]
        reference = np.asarray(input_rows(model.reference, names), dtype=np.float64)
        reference = reference.reshape(len(reference), -1)
        if len(reference) > _MAX_REFERENCE_ROWS:
            pick = np.random.default_rng(0).choice(len(reference), _MAX_REFERENCE_ROWS, replace=False)
            reference = reference[np.sort(pick)]
        self.features = feature_names(model)
        # Each input's columns in the row buffer: one slice assignment per input, no concatenation.
        self._slices: list[tuple[str, int, int]] = []
        start = 0
        for name in names:
            width = math.prod(model.reference[name].shape[1:])
            self._slices.append((name, start, start + width))
            start += width
        self._grids = [_grid(column) for column in reference.T]
        self._reference_cdfs = [
            np.searchsorted(np.sort(column), grid, side="right") / len(column)
            for grid, column in zip(self._grids, reference.T, strict=True)
        ]
        self._cuts = [_cuts(column) for column in reference.T]
        self._expected = [
            _shares(np.bincount(np.searchsorted(c, column, side="right"), minlength=len(c) + 1))
            for c, column in zip(self._cuts, reference.T, strict=True)
        ]
        self._regression = model.manifest.outputs.is_regression
        self._prediction_cuts: np.ndarray | None = None
        self._prediction_expected: np.ndarray | None = None
        self._reference_predictions(model, reference)
        capacity = settings.window_rows
        self._rows = np.zeros((capacity, start), dtype=np.float64)
        self._predictions = np.zeros((capacity, model.manifest.outputs.width), dtype=np.float64)
        self._next = 0
        self._seen = 0  # rows ever appended
        self._judged = 0  # `_seen` at the last evaluation
        self._served = self._refused = self._failed = 0
        self._latencies: deque[float] = deque(maxlen=_MAX_LATENCIES)
        self.last_evaluated: float | None = None
        self.active: set[tuple[str, str]] = set()
        self._latency = _Baseline()
        self._errors = _Baseline()

    def _reference_predictions(self, model: ServedModel, reference: np.ndarray) -> None:
        """The model's own answers on the reference data: what its predictions are compared with."""
        assert model.reference is not None
        inputs = {
            name: reference[:, lo:hi].reshape((len(reference), *model.reference[name].shape[1:]))
            for name, lo, hi in self._slices
        }
        inputs = {n: a.astype(model.reference[n].dtype) for n, a in inputs.items()}
        try:
            out = np.asarray(model.runtime.predict(inputs), dtype=np.float64).reshape(len(reference), -1)
        except Exception as e:  # the model's own failure: the other signals still run
            log.warning("drift: %s cannot predict its reference data (%s)", model.name, type(e).__name__)
            return
        if self._regression:
            self._prediction_cuts = _cuts(out[:, 0])
            values = np.searchsorted(self._prediction_cuts, out[:, 0], side="right")
            self._prediction_expected = _shares(np.bincount(values, minlength=len(self._prediction_cuts) + 1))
        else:
            classes = out.shape[1]
            self._prediction_expected = _shares(np.bincount(out.argmax(axis=1), minlength=classes))

    # The request path: O(rows) copies into preallocated buffers, nothing computed.
    def observe(self, ctx: RequestContext, status: int, reason: str, latency: float) -> None:
        prediction = ctx.prediction
        if prediction is not None:
            self._served += 1
            self._latencies.append(latency)
            request = ctx.request
            if request is not None and not ctx.rows_from_signed_reference:
                self._append(request.inputs, prediction)
            if status >= 500:  # answered by the model, then failed (the audit log, the state store)
                self._failed += 1
        elif reason == _OOD:
            self._refused += 1
        elif status >= 500 and reason not in _DELIBERATE:
            self._failed += 1

    def _append(self, inputs: dict[str, np.ndarray], prediction: np.ndarray) -> None:
        n, capacity = len(prediction), len(self._rows)
        skip = max(0, n - capacity)  # a batch larger than the window: its last rows fill it
        at, rows = self._next, n - skip
        first = min(rows, capacity - at)  # then wrap around to the start
        for name, lo, hi in self._slices:
            block = inputs[name].reshape(n, hi - lo)
            self._rows[at : at + first, lo:hi] = block[skip : skip + first]
            if first < rows:
                self._rows[: rows - first, lo:hi] = block[skip + first :]
        out = prediction.reshape(n, -1)
        self._predictions[at : at + first] = out[skip : skip + first]
        if first < rows:
            self._predictions[: rows - first] = out[skip + first :]
        self._next = (at + rows) % capacity
        self._seen += n

    # The background task's part.
    def snapshot(self) -> _Window:
        """Copies of the buffers (oldest row first) and the counts since the last window; resets them."""
        rows = predictions = None
        capacity = len(self._rows)
        if self._seen >= capacity and self._seen > self._judged:
            order = np.r_[self._next : capacity, 0 : self._next]
            rows, predictions = self._rows[order], self._predictions[order]
            self._judged = self._seen
        requests = self._served + self._refused
        judged = requests >= _MIN_REQUESTS
        window = _Window(
            rows,
            predictions,
            requests if judged else 0,
            self._refused,
            self._failed,
            np.fromiter(self._latencies, dtype=np.float64, count=len(self._latencies)),
        )
        if judged:
            self._served = self._refused = self._failed = 0
            self._latencies.clear()
        return window

    def compute(self, window: _Window) -> Statistics:
        """The statistics of one window. Pure (reads the snapshot and the reference): runs in a thread."""
        psis = kss = None
        prediction_psi = None
        if window.rows is not None and window.predictions is not None:
            psis = np.empty(len(self.features))
            kss = np.empty(len(self.features))
            for j, column in enumerate(window.rows.T):
                cuts = self._cuts[j]
                counts = np.bincount(np.searchsorted(cuts, column, side="right"), minlength=len(cuts) + 1)
                psis[j] = psi(self._expected[j], counts)
                kss[j] = ks_statistic(column, self._grids[j], self._reference_cdfs[j])
            prediction_psi = self._prediction_psi(window.predictions)
        ood = error = p50 = None
        if window.requests:
            ood = window.refused / window.requests
            error = window.failed / max(1, window.requests - window.refused + window.failed)
            if len(window.latencies):
                p50 = float(np.median(window.latencies))
        return Statistics(psis, kss, prediction_psi, window.requests, ood, error, p50)

    def _prediction_psi(self, predictions: np.ndarray) -> float | None:
        if self._prediction_expected is None:
            return None
        if self._prediction_cuts is not None:
            bins = np.searchsorted(self._prediction_cuts, predictions[:, 0], side="right")
            return psi(self._prediction_expected, np.bincount(bins, minlength=len(self._prediction_expected)))
        labels = predictions.argmax(axis=1)
        return psi(self._prediction_expected, np.bincount(labels, minlength=len(self._prediction_expected)))

    def judge(self, stats: Statistics) -> list[Transition]:
        """Alerts that start or clear with these statistics; updates the baselines. On the loop."""
        s = self.settings
        out: list[Transition] = []
        n = len(self._rows)
        if stats.psi is not None and stats.ks is not None:
            for name, p, k in zip(self.features, stats.psi, stats.ks, strict=True):
                detail = (
                    f"{name}: psi {p:.3f} (threshold {s.psi_threshold:g}), ks {k:.3f} "
                    f"(threshold {s.ks_threshold:g}) over the last {n} rows"
                )
                self._flip(out, "feature", name, p / s.psi_threshold, k / s.ks_threshold, detail=detail)
        if stats.prediction_psi is not None:
            detail = (
                f"prediction psi {stats.prediction_psi:.3f} (threshold {s.prediction_psi_threshold:g}) "
                f"over the last {n} rows"
            )
            self._flip(
                out, "prediction", "", stats.prediction_psi / s.prediction_psi_threshold, detail=detail
            )
        if stats.ood_rate is not None and self.model.screen is not None:
            detail = (
                f"{stats.ood_rate:.1%} of {stats.requests} requests refused as out of distribution "
                f"(threshold {s.ood_rate_threshold:.1%})"
            )
            self._flip(out, "out_of_distribution", "", stats.ood_rate / s.ood_rate_threshold, detail=detail)
        if stats.error_rate is not None:
            usual = self._errors.value or 0.0
            detail = (
                f"{stats.error_rate:.1%} of requests failed (baseline {usual:.1%}, "
                f"increase threshold {s.error_rate_increase:.1%})"
            )
            self._flip(out, "errors", "", (stats.error_rate - usual) / s.error_rate_increase, detail=detail)
            if ("errors", "") not in self.active:
                self._errors.update(stats.error_rate)
        if stats.latency_p50 is not None:
            base = self._latency.value
            if base is not None and base > 0 and self._latency.windows >= _WARMUP_WINDOWS:
                ratio = stats.latency_p50 / base
                detail = (
                    f"median latency {stats.latency_p50 * 1000:.2f} ms is {ratio:.2f}x its baseline "
                    f"{base * 1000:.2f} ms (threshold {s.latency_factor:g}x)"
                )
                # Within the floor of the baseline: nothing starts, an active alert clears.
                small = stats.latency_p50 - base < _LATENCY_FLOOR
                self._flip(out, "latency", "", 0.0 if small else ratio / s.latency_factor, detail=detail)
            if ("latency", "") not in self.active:
                self._latency.update(stats.latency_p50)
        return out

    def _flip(self, out: list[Transition], signal: str, feature: str, *ratios: float, detail: str) -> None:
        """`ratios`: value / threshold of each test of the signal; any above 1 starts the alert, all
        below `_CLEAR` end it."""
        key = (signal, feature)
        if key not in self.active and max(ratios) > 1:
            self.active.add(key)
            out.append(Transition(signal, feature, True, detail))
        elif key in self.active and max(ratios) < _CLEAR:
            self.active.discard(key)
            out.append(Transition(signal, feature, False, detail))


@dataclass(slots=True)
class DriftWatch:
    """Every model version's monitor, the metrics and the audit hook. Rebuilt on reload (`build`);
    a version whose bundle and settings did not change keeps its monitor, alerts and baselines."""

    metrics: Metrics
    record_event: Callable[[dict[str, Any]], None]
    monitors: dict[int, DriftMonitor] = field(default_factory=dict)  # id(ServedModel) -> monitor

    @classmethod
    def build(
        cls,
        config: Config,
        registry: ModelRegistry,
        metrics: Metrics,
        record_event: Callable[[dict[str, Any]], None],
        *,
        config_path: str,
        previous: DriftWatch | None = None,
    ) -> DriftWatch:
        """Raises ConfigError for a `[models.drift]` table on a model whose bundle has no reference
        data (the settings would be ignored)."""
        watch = cls(metrics, record_event)
        kept = {(m.model.digest, m.settings): m for m in previous.monitors.values()} if previous else {}
        loaded = {e.path: (e.name, e.version) for e in registry.events if e.decision == "allow"}
        for i, ref in enumerate(config.models):
            if str(ref.path) not in loaded or not ref.drift.enabled:
                continue
            name, version = loaded[str(ref.path)]
            assert name is not None and version is not None
            model = registry.get(name, version)
            if model.reference is None:
                if "drift" in ref.model_fields_set:
                    raise ConfigError(
                        f"{config_path}: models.{i}.drift: the bundle of {name!r} carries no reference data: "
                        "drift settings would be ignored (pack one with --reference, or remove the table)"
                    )
                continue
            monitor = kept.pop((model.digest, ref.drift), None)
            if monitor is None or monitor.model.version != version:
                monitor = DriftMonitor(model, ref.drift)
            else:
                monitor.model = model  # the same bundle reloaded: the same data, a new object
            watch.monitors[id(model)] = monitor
        for gone in kept.values():
            watch._forget(gone)
        return watch

    @property
    def tick(self) -> float:
        """How often the background task looks, in seconds: the shortest interval configured."""
        return min((m.settings.interval_seconds for m in self.monitors.values()), default=10.0)

    def observe(self, ctx: RequestContext, status: int, reason: str, latency: float) -> None:
        """The request path's only call: `latency` in seconds, `reason` the outcome's code."""
        model = ctx.model
        if model is not None:
            monitor = self.monitors.get(id(model))
            if monitor is not None:
                monitor.observe(ctx, status, reason, latency)

    async def evaluate(self, now: float, *, force: bool = False) -> list[Transition]:
        """Evaluate every monitor whose interval has passed (every one with `force`); publish gauges
        and audit the alerts that start or clear. Returns those transitions."""
        transitions: list[Transition] = []
        for monitor in list(self.monitors.values()):
            last = monitor.last_evaluated
            # 0.9: the task sleeps one interval on the monotonic clock; `now` is wall-clock time.
            if not force and last is not None and now - last < 0.9 * monitor.settings.interval_seconds:
                continue
            monitor.last_evaluated = now
            window = monitor.snapshot()
            if window.rows is None and not window.requests:
                continue
            stats = await asyncio.to_thread(monitor.compute, window)
            changed = monitor.judge(stats)
            self._publish(monitor, stats, changed, now)
            transitions.extend(changed)
        return transitions

    def _publish(
        self, monitor: DriftMonitor, stats: Statistics, changed: list[Transition], now: float
    ) -> None:
        m, model = self.metrics, monitor.model
        labels = (model.name, model.version)
        if stats.psi is not None and stats.ks is not None:
            for name, p, k in zip(monitor.features, stats.psi, stats.ks, strict=True):
                m.drift_psi.labels(*labels, name).set(p)
                m.drift_ks.labels(*labels, name).set(k)
        for gauge, value in (
            (m.drift_prediction_psi, stats.prediction_psi),
            (m.drift_ood_rate, stats.ood_rate if model.screen is not None else None),
            (m.drift_error_rate, stats.error_rate),
            (m.drift_latency_p50, stats.latency_p50),
        ):
            if value is not None:
                gauge.labels(*labels).set(value)
        for t in changed:
            m.drift_alert.labels(*labels, t.signal, t.feature).set(1 if t.started else 0)
            if t.started:
                m.drift_alerts.labels(*labels, t.signal).inc()
            self.record_event(
                {
                    "ts": now,
                    "route": "drift",
                    "action": Action.ADMIN.value,
                    "model": model.name,
                    "version": model.version,
                    "digest": model.digest,
                    "decision": "alert" if t.started else "clear",
                    "reason": t.signal,
                    "feature": t.feature or None,
                    "detail": t.detail,
                }
            )

    def _forget(self, monitor: DriftMonitor) -> None:
        """A version no longer served: its series leave the exposition."""
        m, model = self.metrics, monitor.model
        labels = (model.name, model.version)
        for name in monitor.features:
            for gauge in (m.drift_psi, m.drift_ks):
                _remove(gauge, *labels, name)
        for gauge in (m.drift_prediction_psi, m.drift_ood_rate, m.drift_error_rate, m.drift_latency_p50):
            _remove(gauge, *labels)
        for signal, feature in monitor.active:
            _remove(m.drift_alert, *labels, signal, feature)


def _remove(metric: Any, *labels: str) -> None:
    with contextlib.suppress(KeyError):  # never set: nothing to remove
        metric.remove(*labels)
