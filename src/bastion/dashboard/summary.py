"""What the dashboard shows, gathered in process from the server's own parts.

Nothing here is invented or sampled: traffic, denials, latency, drift and the language-model guard
are read from the Prometheus registry (`Metrics.registry`) as `/metrics` would render it; incidents,
keys, models and rollouts from their stores. Every figure since the process started (counters are
cumulative; the page turns them into rates between two polls).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from bastion.config import Action, Grant, OutputDetail, Role
from bastion.containment import MeasureRecords
from bastion.incidents import IncidentRecords, IncidentState
from bastion.isolation import IsolationRecords
from bastion.keys import KeyRecords
from bastion.metrics import Metrics
from bastion.registry import ModelRegistry
from bastion.rollout import Rollouts
from bastion.stages.output_policy import EPSILON, RHO, remaining_budgets
from bastion.state import StateStore

QUANTILES = (0.5, 0.9, 0.99)
_DRIFT_PREFIX = "bastion_drift_"
_MAX_INCIDENTS = 50
_MAX_KEYS_PER_ROLE = 100  # privacy budgets read per role (one state-store read per key and model)


@dataclass(frozen=True, slots=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def samples(metrics: Metrics) -> list[Sample]:
    """Every sample of the registry (the `_created` series left out)."""
    out = []
    for family in metrics.registry.collect():
        for s in family.samples:
            if not s.name.endswith("_created"):
                out.append(Sample(s.name, dict(s.labels), float(s.value)))
    return out


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """The `q` quantile of a cumulative histogram [(upper bound, count <= bound)] sorted by bound,
    the last bound +Inf; seconds. Linear interpolation inside the bucket, as Prometheus's
    `histogram_quantile` does (promql/quantile.go): a quantile in the +Inf bucket is the largest
    finite bound. None when the histogram is empty."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


def _latency(found: list[Sample]) -> dict[str, Any]:
    per_route: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
    overall: dict[float, float] = defaultdict(float)
    for s in found:
        if s.name == "bastion_request_duration_seconds_bucket":
            bound = float(s.labels["le"])
            per_route[s.labels["route"]][bound] += s.value
            overall[bound] += s.value

    def quantiles(cumulative: dict[float, float]) -> dict[str, Any]:
        ordered = sorted(cumulative.items())
        return {
            "count": int(ordered[-1][1]) if ordered else 0,
            **{f"p{round(q * 100)}": histogram_quantile(q, ordered) for q in QUANTILES},
        }

    return {
        "unit": "seconds",
        "since": "start",
        **quantiles(overall),
        "by_route": [{"route": route, **quantiles(c)} for route, c in sorted(per_route.items())],
    }


def _counted(found: list[Sample], name: str, *labels: str) -> list[dict[str, Any]]:
    rows = [
        {**{label: s.labels.get(label, "") for label in labels}, "count": int(s.value)}
        for s in found
        if s.name == name and s.value > 0
    ]
    return sorted(rows, key=lambda r: -int(r["count"]))


def _traffic(found: list[Sample]) -> tuple[dict[str, Any], dict[str, Any]]:
    by_route: dict[str, dict[str, int]] = defaultdict(lambda: {"allowed": 0, "denied": 0})
    by_status: dict[str, int] = defaultdict(int)
    for s in found:
        if s.name != "bastion_requests_total":
            continue
        side = "allowed" if s.labels["decision"] == "allow" else "denied"
        by_route[s.labels["route"]][side] += int(s.value)
        if side == "denied":
            by_status[s.labels["status"]] += int(s.value)
    allowed = sum(r["allowed"] for r in by_route.values())
    denied = sum(r["denied"] for r in by_route.values())
    traffic = {
        "requests": allowed + denied,
        "allowed": allowed,
        "denied": denied,
        "by_route": [{"route": k, **v} for k, v in sorted(by_route.items())],
    }
    denials = {
        "by_status": [{"status": k, "count": v} for k, v in sorted(by_status.items())],
        "by_code": _counted(found, "bastion_denials_total", "code"),
        "authentication": _counted(found, "bastion_auth_failures_total", "reason"),
        "rate_limited": _counted(found, "bastion_rate_limited_total", "code"),
        "containment": _counted(found, "bastion_incidents_total", "model", "signal", "action"),
    }
    return traffic, denials


def _drift(found: list[Sample], registered: Iterable[str]) -> dict[str, Any]:
    """Per feature and per model, one column per `bastion_drift_*` metric the registry holds."""
    names = sorted(n for n in registered if n.startswith(_DRIFT_PREFIX))
    features: dict[tuple[str, str, str], dict[str, float]] = defaultdict(dict)
    models: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for s in found:
        if not s.name.startswith(_DRIFT_PREFIX):
            continue
        column = s.name.removeprefix(_DRIFT_PREFIX).removesuffix("_total")
        model, version = s.labels.get("model", ""), s.labels.get("version", "")
        signal = s.labels.get("signal")
        feature = s.labels.get("feature", "")
        if feature:
            row = features[(model, version, feature)]
            row[column] = max(row.get(column, 0.0), s.value) if signal else s.value
        else:
            models[(model, version)][f"{column}:{signal}" if signal else column] = s.value
    return {
        "metrics": names,  # empty: drift detection is not part of this server
        "features": [
            {"model": m, "version": v, "feature": f, "values": values}
            for (m, v, f), values in sorted(features.items())
        ],
        "models": [{"model": m, "version": v, "values": values} for (m, v), values in sorted(models.items())],
    }


def _charged(grant: Grant) -> str | None:
    """The budget unit a grant spends, if any."""
    if grant.output is OutputDetail.PRIVATE_PREDICTION:
        return RHO
    if grant.output is OutputDetail.DP_SCORES or Action.AGGREGATE in grant.actions:
        return EPSILON
    return None


async def _roles(
    roles: Mapping[str, Role], keys: KeyRecords, registry: ModelRegistry, store: StateStore, *, now: float
) -> list[dict[str, Any]]:
    """Per role: its limits, how many live keys hold it, and what they spent of each privacy
    budget (read from the state store without spending). Daily quota use is not readable: the
    state store has no query that does not spend."""
    live = [k for k in keys.list() if k.status(now) in ("active", "quarantined")]
    served = sorted({m.name for m in registry.models()})
    out = []
    for name, role in sorted(roles.items()):
        holders = [k for k in live if name in k.roles][:_MAX_KEYS_PER_ROLE]
        privacy = []
        for grant in role.grants:
            unit = _charged(grant)
            if unit is None:
                continue
            for model in served if "*" in grant.models else sorted(grant.models):
                spent = 0.0
                for key in holders:
                    left = await remaining_budgets(store, f"key:{key.key_id}", model, unit, grant, now=now)
                    spent += grant.privacy_budget - left["privacy_budget_remaining"]
                privacy.append(
                    {
                        "model": model,
                        "unit": unit,
                        "budget_per_key": grant.privacy_budget,
                        "window_seconds": grant.budget_window_seconds,
                        "spent": round(spent, 6),
                        "keys": len(holders),
                    }
                )
        out.append(
            {
                "role": name,
                "rate": role.rate,
                "burst": role.burst,
                "daily_quota": role.daily_quota,
                "daily_quota_used": None,  # not readable without spending
                "keys": len([k for k in live if name in k.roles]),
                "privacy": privacy,
            }
        )
    return out


async def build_summary(
    *,
    metrics: Metrics,
    incidents: IncidentRecords,
    keys: KeyRecords,
    registry: ModelRegistry,
    isolation: IsolationRecords,
    measures: MeasureRecords,
    rollouts: Rollouts,
    roles: Mapping[str, Role],
    store: StateStore,
    now: float,
) -> dict[str, Any]:
    """The dashboard's JSON (schema `Summary` in the OpenAPI document). Counts are integers,
    latencies seconds, times Unix seconds. Key names and incident details are data from elsewhere:
    the page renders them as text."""
    found = samples(metrics)
    registered = {family.name for family in metrics.registry.collect()}
    traffic, denials = _traffic(found)
    # Newest first within each unresolved state, not among the newest of any state: incidents that
    # a principal can make by the dozen (a ladder that only records), closed or not, must not push
    # another thief's contained incident off the page (red team of issue 12, F14).
    pending = (IncidentState.OPEN, IncidentState.CONTAINED, IncidentState.INVESTIGATING)
    listed = [i for state in pending for i in incidents.list(state=state, limit=_MAX_INCIDENTS)]
    unresolved = [i.as_dict() for i in sorted(listed, key=lambda i: i.id, reverse=True)]
    for incident in unresolved:
        incident.pop("events", None)
    counts = incidents.counts()
    isolated = {model: (since, reason) for model, since, reason in isolation.list()}
    quarantined = [
        {"key_id": k.key_id, "name": k.name, "roles": list(k.roles), "quarantined_at": k.quarantined_at}
        for k in keys.list()
        if k.quarantined_at is not None and k.revoked_at is None
    ]
    return {
        "generated_at": now,
        "traffic": traffic,
        "denials": denials,
        "latency": _latency(found),
        "roles": await _roles(roles, keys, registry, store, now=now),
        "privacy_global": [
            {"model": s.labels["model"], "unit": s.labels["unit"], "remaining": s.value}
            for s in found
            if s.name == "bastion_privacy_global_budget_remaining"
        ],
        "incidents": {
            "counts": counts,
            "unresolved": unresolved,  # at most _MAX_INCIDENTS of each unresolved state
            "unresolved_total": sum(counts.get(s.value, 0) for s in pending),
        },
        "quarantined_keys": quarantined,
        # The ladder's timed steps in force (throttle, degrade, reroute): released with the key.
        "contained": [
            {"principal": who, "model": model, "step": kind, "value": value, "until": until}
            for who, model, kind, value, until in measures.list(now=now)
        ],
        "models": {
            "served": [
                {
                    "name": m.name,
                    "version": m.version,
                    "digest": m.digest,
                    "runtime": m.manifest.runtime,
                    "isolated": m.name in isolated,
                }
                for m in sorted(registry.models(), key=lambda m: (m.name, m.version))
            ],
            "isolated": [
                {"model": model, "since": since, "reason": reason}
                for model, (since, reason) in isolated.items()
            ],
            "rollouts": [
                {
                    "model": model,
                    "stable": s.stable,
                    "canary": s.canary,
                    "weight": s.weight,
                    "status": s.status,
                    "reason": s.reason,
                    "changed_at": s.changed_at,
                }
                for model, s in sorted(rollouts.states.items())
            ],
        },
        "drift": _drift(found, registered),
        "llm": {
            "guard_hits": _counted(found, "bastion_llm_guard_hits_total", "model", "detector"),
            "tokens": _counted(found, "bastion_llm_tokens_total", "model", "kind"),
        },
    }
