"""Prometheus metrics. Labels come from fixed sets only: no principal, key or payload value,
and a model label only for models that exist (an attacker cannot mint label values).

With `[metrics] enabled = false` nothing is exposed: `render` raises NotFound (404 to every
caller) and the per-request figures are not collected."""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from bastion.errors import ErrorCode, NotFound

UNKNOWN = "_unknown"
# Set by `bastion serve --workers` for its workers (bastion.workers): prometheus_client then keeps
# every value in files there, one per process, and `render` aggregates them.
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self.registry = CollectorRegistry(auto_describe=True)
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self.requests = Counter(
            "bastion_requests",
            "Requests answered, by route, model, status and decision.",
            ["route", "model", "status", "decision"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "bastion_request_duration_seconds",
            "Time from request to response, by route and model.",
            ["route", "model"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.denials = Counter(
            "bastion_denials",
            "Refused requests by stable error code (a fixed set: bastion.errors.ErrorCode).",
            ["code"],
            registry=self.registry,
        )
        self.auth_failures = Counter(
            "bastion_auth_failures",
            "Authentication failures by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.limited = Counter(
            "bastion_rate_limited",
            "Requests refused by a rate limit or quota.",
            ["code"],
            registry=self.registry,
        )
        self.models_loaded = _gauge(
            "bastion_models_loaded", "Model versions being served.", registry=self.registry
        )
        self.models_refused = _gauge(
            "bastion_models_refused", "Configured models refused at load.", registry=self.registry
        )
        self.rollbacks = Counter(
            "bastion_rollout_rollbacks",
            "Automatic canary rollbacks, by model and reason.",
            ["model", "reason"],
            registry=self.registry,
        )
        self.canary_weight = _gauge(
            "bastion_rollout_canary_weight",
            "Share of unversioned traffic sent to the canary.",
            ["model"],
            registry=self.registry,
        )
        self.global_privacy = _gauge(
            "bastion_privacy_global_budget_remaining",
            "Global privacy budgets: what is left in the window for all principals together, by model "
            "and unit (epsilon: dp_scores and aggregates; rho: private prediction).",
            ["model", "unit"],
            registry=self.registry,
        )
        self.incidents = Counter(
            "bastion_incidents",
            "Query auditing: principals flagged for suspected extraction, by model, signal and action.",
            ["model", "signal", "action"],
            registry=self.registry,
        )
        self.incident_states = _gauge(
            "bastion_incidents_by_state",
            "Incidents by lifecycle state (open, contained, investigating, remediated, closed).",
            ["state"],
            registry=self.registry,
        )
        self.llm_tokens = Counter(
            "bastion_llm_tokens",
            "Language-model tokens used, by model and kind (prompt, completion).",
            ["model", "kind"],
            registry=self.registry,
        )
        self.llm_guard_hits = Counter(
            "bastion_llm_guard_hits",
            "Answers the leakage guard withheld, by model and detector family "
            "(canary, secret, overlap, rouge_l).",
            ["model", "detector"],
            registry=self.registry,
        )
        self.audit_failures = Counter(
            "bastion_audit_failures",
            "Requests failed closed because the audit log was unavailable.",
            registry=self.registry,
        )
        self.refusals_counted = Counter(
            "bastion_refusals_counted",
            "Refusals before identity counted into a per-address summary record instead of their own.",
            registry=self.registry,
        )
        self.failed_auth_addresses = _gauge(  # summed over workers: each tracks its own addresses
            "bastion_failed_auth_addresses",
            "Client addresses (IPv6: networks) tracked for failed authentication.",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        # Drift (bastion.drift): set by its background task, labelled by the manifest's own names.
        per_feature = ["model", "version", "feature"]
        self.drift_psi = _gauge(
            "bastion_drift_psi",
            "Population stability index of a feature over the last window of served rows vs the reference.",
            per_feature,
            registry=self.registry,
        )
        self.drift_ks = _gauge(
            "bastion_drift_ks",
            "Two-sample Kolmogorov-Smirnov statistic of a feature, last window vs the reference.",
            per_feature,
            registry=self.registry,
        )
        self.drift_prediction_psi = _gauge(
            "bastion_drift_prediction_psi",
            "Population stability index of the predictions vs the model's on its reference data.",
            ["model", "version"],
            registry=self.registry,
        )
        self.drift_ood_rate = _gauge(
            "bastion_drift_ood_rate",
            "Share of the last window's requests refused as out of distribution.",
            ["model", "version"],
            registry=self.registry,
        )
        self.drift_error_rate = _gauge(
            "bastion_drift_error_rate",
            "Share of the last window's requests that failed on the server's side.",
            ["model", "version"],
            registry=self.registry,
        )
        self.drift_latency_p50 = _gauge(
            "bastion_drift_latency_p50_seconds",
            "Median latency of the last window's answered requests.",
            ["model", "version"],
            registry=self.registry,
        )
        self.drift_alert = _gauge(
            "bastion_drift_alert",
            "1 while a drift or anomaly alert is active, by signal (feature, prediction, "
            "out_of_distribution, latency, errors) and feature (empty but for feature).",
            ["model", "version", "signal", "feature"],
            registry=self.registry,
        )
        self.drift_alerts = Counter(
            "bastion_drift_alerts",
            "Drift and anomaly alerts raised, by model, version and signal.",
            ["model", "version", "signal"],
            registry=self.registry,
        )

        self.breaker_state = _gauge(
            "bastion_model_breaker_state",
            "A model version's circuit breaker: 0 closed, 1 half-open, 2 open.",
            ["model", "version"],
            registry=self.registry,
        )
        self.breaker_transitions = Counter(
            "bastion_model_breaker_transitions",
            "Circuit breaker state changes, by model, version and the state entered.",
            ["model", "version", "state"],
            registry=self.registry,
        )
        self.inference_timeouts = Counter(
            "bastion_inference_timeouts",
            "Runtime calls answered 504 at their inference_timeout_seconds, by model and version.",
            ["model", "version"],
            registry=self.registry,
        )
        self.inference_stuck = _gauge(
            "bastion_inference_stuck_calls",
            "Runtime calls past their deadline whose thread has not returned yet (a thread cannot be "
            "killed; bounded by the model's inference_threads).",
            ["model", "version"],
            registry=self.registry,
        )

    def observe_request(self, route: str, model: str, status: int, latency: float) -> None:
        if not self.enabled:
            return
        # Label lookups cost microseconds each; the children are few, so keep them.
        key = (route, model, status)
        children = self._children.get(key)
        if children is None:
            decision = "allow" if status < 400 else "deny"
            children = (
                self.requests.labels(route, model, str(status), decision),
                self.latency.labels(route, model),
            )
            self._children[key] = children
        children[0].inc()
        children[1].observe(latency)

    def render(self) -> bytes:
        """The exposition text. Raises NotFound when metrics are disabled.

        Under `bastion serve --workers` (PROMETHEUS_MULTIPROC_DIR set by the supervisor) every
        worker's values, summed (counters, histograms) or their maximum among live workers (gauges),
        whichever worker answers the scrape."""
        if not self.enabled:
            raise NotFound("metrics are disabled on this server", code=ErrorCode.METRICS_DISABLED)
        shared = os.environ.get(MULTIPROCESS_DIR)
        if shared:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=shared)  # type: ignore[no-untyped-call]
            return bytes(generate_latest(registry))
        return bytes(generate_latest(self.registry))


def _gauge(*args: Any, **kwargs: Any) -> Gauge:
    # With workers, a gauge is each worker's own (models loaded, drift of its sample, a count read
    # from the shared store): the largest among live workers, never a per-PID series.
    kwargs.setdefault("multiprocess_mode", "livemax")
    return Gauge(*args, **kwargs)
