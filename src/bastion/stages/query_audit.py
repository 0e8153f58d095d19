"""Query auditing and containment: watch each principal's query stream for extraction, and act.

Two stages and the action between them:
- `ContainmentGate`, right after identity: a quarantined key is refused (403 `key_quarantined`)
  on every route until an operator releases it (`bastion keys release KEY_ID`); its tokens too.
- `WatchQueries`, after the input guard: the model's `ExtractionMonitor` sees every admitted row
  (and, through the input guard, every row refused as out of distribution).
- `Containment`: when the monitor flags a principal, an `incident` record goes to the audit log
  (principal, model, version, digest, signal and counts; never a row), the incidents metric
  counts it, and the model's `extraction_watch` action applies: `quarantine` (the default)
  refuses this request and every later one with the key; `alert` only records. A model with
  `isolate_after = N` is isolated once N principals are flagged on it within its window.
- `IsolationGate`, after authorization: an isolated model answers nobody (503 `model_isolated`)
  until an operator releases it (`bastion models release NAME`).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Any

from bastion.config import OutputDetail
from bastion.containment import MeasureRecords
from bastion.context import RequestContext
from bastion.errors import ErrorCode, NotReady, PermissionDenied, RateLimited
from bastion.extraction import Suspicion
from bastion.incidents import IncidentRecords
from bastion.isolation import IsolationRecords
from bastion.keys import KeyRecords
from bastion.metrics import Metrics
from bastion.query_history import SharedHistories
from bastion.registry import ModelRegistry
from bastion.state import LimitSpec, StateStore

QUARANTINED = (
    "this key is quarantined: query auditing flagged its requests. An operator can review the "
    "incident in the audit log and release the key with `bastion keys release KEY_ID`"
)


def quarantined() -> PermissionDenied:
    return PermissionDenied(QUARANTINED, code=ErrorCode.KEY_QUARANTINED)


ISOLATED = (
    "model {model!r} is isolated: query auditing flagged principals on it. An operator can review the "
    "incidents and release it with `bastion models release NAME`"
)


class IsolationGate:
    def __init__(self, isolation: IsolationRecords) -> None:
        self._isolation = isolation

    async def __call__(self, ctx: RequestContext) -> None:
        model = ctx.model
        isolating = model is not None and (model.isolate_after or "isolate" in model.containment.steps)
        if isolating and model is not None and self._isolation.isolated(model.name):
            raise NotReady(ISOLATED.format(model=model.name), code=ErrorCode.MODEL_ISOLATED)


class ApplyMeasures:
    """The timed steps of the containment ladder in force for this principal on this model:
    throttle (429 `throttled` past its rate), degrade (the answer's detail lowered), reroute (kept on
    the stable version, whatever version the request names). After authorization, before the input
    guard."""

    def __init__(
        self,
        measures: MeasureRecords,
        store: StateStore,
        pick_stable: Callable[[str], str | None],
        registry: ModelRegistry,
    ) -> None:
        self._measures = measures
        self._store = store
        self._pick_stable = pick_stable
        self._registry = registry

    async def __call__(self, ctx: RequestContext) -> None:
        model, principal = ctx.model, ctx.principal
        assert model is not None and principal is not None
        measures = self._measures.active(principal.id, model.name, now=ctx.now)
        if not measures:
            return
        if measures.throttle_rate is not None:
            # In rows, not requests: a throttled thief must not keep taking 256-row batches. A batch
            # larger than the bucket is refused outright while the step lasts.
            rows = ctx.request.rows if ctx.request is not None else 1
            burst = max(1, math.ceil(measures.throttle_rate))
            if rows > burst:
                raise RateLimited(
                    f"this key is throttled on this model: at most {burst} rows a request while it lasts",
                    retry_after=1.0,
                    code=ErrorCode.THROTTLED,
                )
            spec = LimitSpec(rate=measures.throttle_rate, burst=burst, daily_quota=10**12)
            admission = await self._store.acquire(
                f"{principal.id}|throttle|{model.name}", spec, now=ctx.now, cost=rows
            )
            if not admission.allowed:
                raise RateLimited(
                    "this key is throttled on this model: query auditing flagged its requests",
                    retry_after=admission.retry_after,
                    code=ErrorCode.THROTTLED,
                )
        if measures.degrade_to is not None and ctx.output_detail is not None:
            lowered = OutputDetail(measures.degrade_to)
            if lowered.rank < ctx.output_detail.rank:
                ctx.output_detail = lowered
        if measures.reroute:
            # Every request of the principal during the rollout, the ones naming a version too: a
            # rerouted thief asking for /versions/<canary> explicitly is still answered by the stable
            # one (red team of issue 12, F3).
            stable = self._pick_stable(model.name)
            if stable is not None and stable != model.version:
                ctx.model = self._registry.get(model.name, stable)


class ContainmentGate:
    async def __call__(self, ctx: RequestContext) -> None:
        if ctx.principal is not None and ctx.principal.quarantined:
            raise quarantined()


class Containment:
    def __init__(
        self,
        keys: KeyRecords,
        isolation: IsolationRecords,
        metrics: Metrics,
        record: Callable[[dict[str, Any]], None],
        incidents: IncidentRecords,
        measures: MeasureRecords,
    ) -> None:
        self._keys = keys
        self._isolation = isolation
        self._metrics = metrics
        self._record = record
        self._incidents = incidents
        self._measures = measures
        self._flagged: dict[str, deque[tuple[float, str]]] = {}  # model -> (time, principal) flagged

    def __call__(self, ctx: RequestContext, suspicion: Suspicion) -> None:
        model, principal = ctx.model, ctx.principal
        assert model is not None and principal is not None and model.monitor is not None
        # The ladder's rung: this principal's incidents on this model so far.
        policy = model.containment
        action = policy.step(self._incidents.count_for(principal.id, model.name))
        self._record_incident(ctx, action, suspicion.describe(), signal=suspicion.signal)
        self._metrics.incidents.labels(model.name, suspicion.signal, action).inc()
        model.monitor.forget(principal.id)  # the next rung takes new evidence; a released key starts afresh
        if model.isolate_after:
            self._count_towards_isolation(ctx)
        until = ctx.now + policy.seconds
        if action == "throttle":
            self._measures.apply(
                principal.id,
                model.name,
                "throttle",
                value=str(policy.throttle_rate),
                now=ctx.now,
                until=until,
            )
        elif action == "degrade":
            self._measures.apply(
                principal.id, model.name, "degrade", value=policy.degrade_to, now=ctx.now, until=until
            )
            lowered = OutputDetail(policy.degrade_to)
            if ctx.output_detail is not None and lowered.rank < ctx.output_detail.rank:
                ctx.output_detail = lowered  # from the request that tipped it on
        elif action == "reroute":
            self._measures.apply(principal.id, model.name, "reroute", value=None, now=ctx.now, until=until)
        elif action == "quarantine":
            self._keys.quarantine(principal.key_id, now=ctx.now)
            raise quarantined()
        elif action == "isolate":
            detail = f"{principal.id} flagged: {suspicion.signal}"
            self._isolation.isolate(model.name, now=ctx.now, reason=detail)
            raise NotReady(ISOLATED.format(model=model.name), code=ErrorCode.MODEL_ISOLATED)

    def _record_incident(self, ctx: RequestContext, decision: str, detail: str, *, signal: str) -> None:
        """Lineage of the request that tipped it (the keyed HMAC of its payload, None if the row was
        refused before the HMAC), never a row; and an incident for operators to move along."""
        model, principal = ctx.model, ctx.principal
        assert model is not None and principal is not None
        isolation = decision == "isolate_model"
        self._incidents.open(
            kind="several_principals" if isolation else "extraction_suspected",
            model=model.name,
            principal=None if isolation else principal.id,
            action=decision,
            detail=detail,
            evidence={"signal": signal, "version": model.version, "digest": model.digest},
            request_id=ctx.request_id,
            now=ctx.now,
        )
        self._record(
            {
                "ts": ctx.now,
                "request_id": ctx.request_id,
                "route": "incident",
                "action": ctx.action.value,
                "principal": principal.id,
                "via": principal.via,
                "model": model.name,
                "version": model.version,
                "digest": model.digest,
                "decision": decision,
                "reason": "extraction_suspected",
                "detail": detail,
                "payload_hmac": ctx.payload_hmac,
            }
        )

    def _count_towards_isolation(self, ctx: RequestContext) -> None:
        model, principal = ctx.model, ctx.principal
        assert model is not None and principal is not None
        flagged = self._flagged.setdefault(model.name, deque())
        flagged.append((ctx.now, principal.id))
        while flagged and flagged[0][0] < ctx.now - model.isolation_window:
            flagged.popleft()
        principals = {who for _, who in flagged}
        if len(principals) < model.isolate_after:
            return
        detail = f"{len(principals)} principals flagged within {model.isolation_window:g} s"
        if self._isolation.isolate(model.name, now=ctx.now, reason=detail):
            self._record_incident(ctx, "isolate_model", detail, signal="several_principals")
            self._metrics.incidents.labels(model.name, "several_principals", "isolate_model").inc()
        flagged.clear()


class WatchQueries:
    """`histories`: where the monitors' per-principal histories live when several processes serve
    (bastion.query_history, chosen by `state.backend`); None keeps them in this process."""

    def __init__(self, contain: Containment, histories: SharedHistories | None = None) -> None:
        self._contain = contain
        self._histories = histories

    async def __call__(self, ctx: RequestContext) -> None:
        model, request, principal = ctx.model, ctx.request, ctx.principal
        assert model is not None and request is not None and principal is not None
        if model.monitor is None or ctx.rows_from_signed_reference:
            return
        monitor = model.monitor
        measured = ctx.measured
        if measured is None:  # the model's screen is off: the monitor measures with its own
            measured = monitor.screen.measure(request.inputs, [s.name for s in model.manifest.inputs])
        if self._histories is None:
            suspicion = monitor.observe(principal.id, *measured)
        else:
            suspicion = await self._histories.observe(monitor, _history_key(ctx), *measured)
        if suspicion is not None:
            self._contain(ctx, suspicion)

    async def refused(self, ctx: RequestContext) -> None:
        """The input guard refused a row as out of distribution: that counts too."""
        model, principal = ctx.model, ctx.principal
        if model is None or principal is None or model.monitor is None:
            return
        if self._histories is None:
            suspicion = model.monitor.refused(principal.id)
        else:
            suspicion = await self._histories.refused(model.monitor, _history_key(ctx))
        if suspicion is not None:
            self._contain(ctx, suspicion)


def _history_key(ctx: RequestContext) -> str:
    model, principal = ctx.model, ctx.principal
    assert model is not None and principal is not None
    return f"{model.name}|{model.version}|{principal.id}"  # one monitor per model version
