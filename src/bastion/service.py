"""The Bastion service: opens its parts and runs one request through its route's pipeline.

The pipelines are built in `bastion.assembly.build_pipelines`, the one place that says in
which order the defenses run. The audit write is the outer layer of `handle`, so no path
through any stage can skip it, and in "sync" durability the response waits for the record's
commit.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bastion.assembly import (
    build_pipelines,
    failed_auth_policy,
    load_or_create_secret,
    open_query_histories,
    open_state_store,
)
from bastion.audit import AuditLog
from bastion.audit.log import AuditUnavailable
from bastion.audit.sink import open_sink
from bastion.breaker import STATE_VALUE, ModelGuards, Transition
from bastion.config import (
    Action,
    Config,
    OutputDetail,
    check_against_models,
    load_config,
    restart_only_changes,
)
from bastion.context import RequestContext
from bastion.drift import DriftWatch
from bastion.errors import (
    HTTP_STATUS,
    AuthenticationFailed,
    AuthThrottled,
    BastionError,
    ConfigError,
    ErrorCode,
    MethodNotAllowed,
    ModelCircuitOpen,
    ModelOverloaded,
    NotReady,
    RateLimited,
)
from bastion.llm.intent import ExtractionTracker
from bastion.llm.models import ChatModel, load_chat_models
from bastion.llm.types import ChatBackend, StreamEnd
from bastion.metrics import UNKNOWN, Metrics
from bastion.policy import Policy
from bastion.privacy import AnswerCache, NoiseSource, OpenDPNoise
from bastion.records import open_records
from bastion.registry import ModelRegistry
from bastion.rollout import Rollback, Rollouts
from bastion.routes import ROUTE_ACTIONS, Route
from bastion.stages import Stage
from bastion.stages.address_limits import FailedAuthLimiter
from bastion.stages.chat import LazyRedactor, user_digest
from bastion.stages.output_policy import PrivateScores
from bastion.statedir import StateDirLock, StatePaths, lock_state_dir, make_private_dir
from bastion.tokens import TokenAuthority, load_or_create_signing_key

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

    from bastion.tracing import Tracing

log = logging.getLogger("bastion")
# The audit record's and the metrics' route, action and output-detail strings, read once (an enum's
# `.value` is two Python calls, five times a request).
_ROUTE_VALUE = {route: route.value for route in Route}
_ROUTE_ACTION = {route: action.value for route, action in ROUTE_ACTIONS.items()}
_DETAIL_VALUE = {detail: detail.value for detail in OutputDetail}


@dataclass(slots=True)
class Outcome:
    status: int
    body: dict[str, Any] | bytes
    headers: dict[str, str]
    # A streamed answer (`stream: true` on /v1): text deltas, then one StreamEnd; it raises BastionError
    # if it is cut off (the leakage guard, the audit). Its closing audit record is written before it ends.
    stream: AsyncGenerator[str | StreamEnd, None] | None = None


class Bastion:
    def __init__(
        self,
        config: Config,
        *,
        config_path: Path = Path("bastion.toml"),
        unsafe_no_defenses: bool = False,
        clock: Callable[[], float] = time.time,
        noise: NoiseSource | None = None,
        chat_backends: Mapping[str, ChatBackend] | None = None,
        span_exporter: SpanExporter | None = None,
        state_lock: StateDirLock | None = None,
    ) -> None:
        """`state_lock`: the state directory's lock already held for this process (a worker of
        `bastion serve --workers` inherits its supervisor's); None takes it here.
        `chat_backends`: ready language-model backends by model name, used instead of building the
        ones `[llm]` names (tests and benchmarks put a scripted backend beside the real ones).
        `span_exporter`: with `[tracing] enabled`, where spans go instead of the OTLP endpoint (tests:
        the SDK's in-memory exporter)."""
        self.config = config
        self._chat_backends = chat_backends
        self._span_exporter = span_exporter
        self.config_path = config_path
        self._reloading = False
        self._closed = False
        self.clock = clock
        self.unsafe_no_defenses = unsafe_no_defenses
        paths = StatePaths(config.server.state_dir)
        make_private_dir(paths.root)
        self.paths = paths
        # First, before any database in the directory is opened: a second server touches nothing.
        self._state_lock = state_lock if state_lock is not None else lock_state_dir(paths.root)
        # A worker of a supervisor shares its ports with its siblings (SO_REUSEPORT; bastion.workers).
        self.shares_ports = state_lock is not None
        try:
            self._open(config, config_path, clock, noise)
        except BaseException:
            self._state_lock.release()
            raise

    def _open(
        self, config: Config, config_path: Path, clock: Callable[[], float], noise: NoiseSource | None
    ) -> None:
        paths = self.paths
        unsafe_no_defenses = self.unsafe_no_defenses
        self.registry = ModelRegistry.load(list(config.models))
        check_against_models(config, self.registry, config_path)
        self.policy = Policy.from_config(config)
        self.metrics = Metrics(enabled=config.metrics.enabled)
        self.metrics.models_loaded.set(len(self.registry.models()))
        self.metrics.models_refused.set(len(self.registry.failures))
        # Drift and anomaly alerts per model with reference data (bastion.drift): requests feed its
        # buffers in `handle`; `startup` starts the task that computes them.
        self.drift = DriftWatch(self.metrics, self._record_event)
        if not unsafe_no_defenses:
            self.drift = DriftWatch.build(
                config, self.registry, self.metrics, self._record_event, config_path=str(config_path)
            )
        self._drift_task: asyncio.Task[None] | None = None
        self._load_events_task: asyncio.Task[None] | None = None  # audit sink down at start-up
        # Keys, quarantines, isolations, measures, incidents and rollout state: SQLite files in the
        # state directory, or Redis / PostgreSQL shared by every replica (bastion.records).
        self.records = open_records(config, paths)
        self.keys = self.records.keys
        self.isolation = self.records.isolation
        self.incidents = self.records.incidents
        self.measures = self.records.measures
        # Dashboard sessions and the tokens' deny list: in the same shared records, or the state
        # directory's records.db (every worker on it shares them).
        self.sessions = self.records.sessions
        self.tokens = TokenAuthority(
            load_or_create_signing_key(paths.token_key),
            issuer=config.tokens.issuer,
            audience=config.tokens.audience,
            default_ttl=config.tokens.ttl_seconds,
            revocations=self.records.token_revocations,
        )
        self.state = open_state_store(config, paths)
        self.histories = (
            None if unsafe_no_defenses else open_query_histories(config, paths, worker=self.shares_ports)
        )
        self.audit: AuditLog | None = None
        if unsafe_no_defenses:
            log.warning("UNSAFE: serving with every defense off (benchmark baseline only)")
        else:
            a = config.audit
            # SQLite in the state directory, or one PostgreSQL chain for every replica (bastion.audit).
            self.audit = AuditLog(
                open_sink(a, paths), flush_delay=0.0 if a.durability == "sync" else 0.005, clock=clock
            )
        self._wait_for_audit = config.audit.durability == "sync"
        # The model's global budget comes from the current policy (reloads included), not from one grant.
        self.private_scores = PrivateScores(
            self.state,
            noise or OpenDPNoise(),
            AnswerCache(),
            global_budgets=lambda model, unit: self.policy.global_budget(model, unit),
        )
        self.private_scores.on_global_spend = lambda model, unit, left: self.metrics.global_privacy.labels(
            model, unit
        ).set(left)
        self.rollouts = self._rollouts(config, config_path)
        self._hmac_key = load_or_create_secret(paths.hmac_key)
        # Kept across reloads (a SIGHUP must not forgive an address); its policy follows the config.
        self.failed_auth = FailedAuthLimiter(
            failed_auth_policy(config), record=self._record_event, clock=clock
        )
        # Refusals past a principal's rate limit or quota: counted the same way, per principal.
        self.over_limit = FailedAuthLimiter(
            failed_auth_policy(config),
            record=self._record_event,
            clock=clock,
            route="refused_over_limit",
            subject="principal",
        )
        self.started = int(clock())
        self.redactor = LazyRedactor()
        self.extraction_tracker = ExtractionTracker()
        self.tracing: Tracing | None = None
        if config.tracing.enabled:  # off, bastion.tracing (and OpenTelemetry's SDK) is never imported
            from bastion.tracing import Tracing

            self.tracing = Tracing(config.tracing, exporter=self._span_exporter)
        # Each model version's deadline, threads and circuit breaker (bastion.breaker); kept across
        # reloads: a SIGHUP neither closes an open breaker nor forgets a stuck call.
        self.guards = ModelGuards(clock=time.monotonic, observe=self._observe_guard)
        self.chat_models: dict[str, ChatModel] = {}
        self.chat_models = load_chat_models(config, config_path, backends=self._chat_backends)
        if any(m.settings.redacts_input or m.settings.redacts_output for m in self.chat_models.values()):
            self.redactor.load()  # at start-up, not on the first request
        self.pipelines = self.build_pipelines(self._hmac_key)

    def build_pipelines(self, hmac_key: bytes) -> dict[Route, list[Stage]]:
        pipelines = build_pipelines(self, hmac_key, record_event=self._record_event)
        # Traced, each stage runs in a child span; untraced, the stages are themselves (no cost).
        return pipelines if self.tracing is None else self.tracing.wrap_pipelines(pipelines)

    def _rollouts(self, config: Config, config_path: Path) -> Rollouts:
        known = self.registry.configured_names
        for model in config.rollouts:
            if model not in known:
                raise ConfigError(f"{config_path}: rollouts.{model}: model {model!r} is not configured")
        rollouts = Rollouts(
            dict(config.rollouts),
            self.records.rollouts,
            served=lambda name, version: (
                version in {m.version for m in self.registry.models() if m.name == name}
            ),
            clock=self.clock,
        )
        for model, state in rollouts.states.items():
            self.metrics.canary_weight.labels(model).set(state.weight)
        return rollouts

    async def startup(self) -> None:
        try:
            await self._audit_load_events(self.registry)
        except AuditUnavailable:
            # A PostgreSQL audit sink not answering yet: start (live, not ready, every request 503)
            # and write the model-load records as soon as it answers.
            log.error("audit log unavailable at start-up: refusing requests until it answers")
            self._load_events_task = asyncio.get_running_loop().create_task(self._audit_load_events_later())
        if self._drift_task is None:
            self._drift_task = asyncio.get_running_loop().create_task(self._watch_drift())

    async def _watch_drift(self) -> None:
        """The drift monitors' background task: their statistics every interval, off the request path."""
        while True:
            await asyncio.sleep(self.drift.tick)
            try:
                await self.drift.evaluate(self.clock())
            except Exception as e:  # monitoring goes on; the type only (a message could quote data)
                log.error("drift evaluation failed: %s", type(e).__name__)

    async def reload(self) -> None:
        """Re-read the policy file and re-verify the models, then switch over in one step.

        Models, roles, rollouts and request limits take effect; requests already running finish
        with the pipeline and model they started with. If anything fails, the previous
        configuration keeps serving, as it does when a setting of `config.RESTART_ONLY` changed.
        """
        if self._reloading:
            return
        self._reloading = True
        try:
            config = load_config(self.config_path)
            changed = restart_only_changes(self.config, config)
            if changed:
                raise ConfigError(
                    f"{self.config_path}: {', '.join(changed)}: changed; these take effect on restart only"
                )
            registry = await asyncio.get_running_loop().run_in_executor(
                None, ModelRegistry.load, list(config.models)
            )
            check_against_models(config, registry, self.config_path)
            previous = (self.registry, self.policy, self.rollouts, self.config)
            self.registry, self.policy, self.config = registry, Policy.from_config(config), config
            try:
                self.rollouts = self._rollouts(config, self.config_path)
                drift = DriftWatch.build(
                    config,
                    registry,
                    self.metrics,
                    self._record_event,
                    config_path=str(self.config_path),
                    previous=self.drift,
                )
            except ConfigError:
                self.registry, self.policy, self.rollouts, self.config = previous
                raise
            self.drift = drift
            self.metrics.models_loaded.set(len(registry.models()))
            self.metrics.models_refused.set(len(registry.failures))
            self.pipelines = self.build_pipelines(self._hmac_key)
            log.info("reloaded %s: %d model versions serving", self.config_path, len(registry.models()))
            await self._audit_load_events(registry)
        except ConfigError as e:
            log.error("reload refused, the previous configuration keeps serving: %s", e)
        finally:
            self._reloading = False

    async def _audit_load_events(self, registry: ModelRegistry) -> None:
        """Record what happened to every configured model (verified or refused, and why)."""
        if self.audit is None:
            return
        for event in registry.events:
            record = {
                "ts": self.clock(),
                "route": "model_load",
                "action": Action.ADMIN.value,
                "model": event.name or event.path,
                "version": event.version,
                "digest": event.digest,
                "decision": event.decision,
                "reason": event.reason,
                "detail": event.detail,
            }
            pending = self.audit.submit(record, wait=True)
            if pending is not None:
                await pending

    async def _audit_load_events_later(self) -> None:
        assert self.audit is not None
        while True:
            await asyncio.sleep(0.1)
            if self.audit.healthy:
                try:
                    await self._audit_load_events(self.registry)
                except AuditUnavailable:
                    continue
                return

    @property
    def ready(self) -> bool:
        # Not ready until the model-load records are written (an audit sink down at start-up).
        loads_pending = self._load_events_task is not None and not self._load_events_task.done()
        audit_ok = (self.audit is None or self.audit.healthy) and not loads_pending
        return audit_ok and not self.registry.failures and bool(self.registry.models())

    async def is_ready(self) -> bool:
        """Ready, and the state store answers: a replica whose Redis is gone takes no traffic."""
        audit = self.audit is None or await self.audit.reachable()  # a PostgreSQL audit sink answers
        # The shared records (keys, containment): their own deadline, off the loop; False at once
        # while a hung backend is marked down (bastion.records.Guard, which logs the setting).
        shared = self.records.shared
        records = shared is None or await asyncio.to_thread(shared.reachable)
        return self.ready and audit and records and await self.state.reachable()

    def close(self) -> None:
        """Flush and close everything; safe to call twice (lifespan shutdown, then the CLI's finally)."""
        if self._closed:
            return
        self._closed = True
        if self.audit is not None:
            self.failed_auth.flush(self.clock())  # the summaries of windows still open
            self.over_limit.flush(self.clock())
            self.audit.close()
        self.state.close()
        self.keys.close()
        self.isolation.close()
        self.incidents.close()
        self.measures.close()
        self.records.records.close()  # sessions and token revocations (idempotent if shared)
        self.guards.close()
        if self.tracing is not None:
            self.tracing.provider.shutdown()  # the spans still queued are exported first
        self._state_lock.release()

    async def aclose(self) -> None:
        """The server's shutdown, on its event loop. The state store goes first: it waits for the
        blocks being leased in the background, so that those too are given back."""
        if not self._closed:
            if self._drift_task is not None:
                self._drift_task.cancel()
            if self._load_events_task is not None:
                self._load_events_task.cancel()
            for model in self.chat_models.values():
                await model.backend.aclose()
            await self.state.aclose()
            if self.histories is not None:
                await self.histories.aclose()
            self.close()

    async def handle(self, route: Route, ctx: RequestContext) -> Outcome:
        if self.tracing is not None:
            return await self.tracing.request(route, ctx, self._handle)
        return await self._handle(route, ctx)

    async def _handle(self, route: Route, ctx: RequestContext) -> Outcome:
        started = time.perf_counter()
        reason = "ok"
        try:
            stages = self.pipelines.get(route)
            if stages is None:
                raise NotReady("route disabled", code=ErrorCode.ROUTE_DISABLED)
            for stage in stages:
                await stage(ctx)
            outcome = Outcome(200, ctx.result_text if ctx.result_text is not None else ctx.result or {}, {})
            if ctx.chat is not None and ctx.chat.stream is not None:
                return await self._open_stream(route, ctx, outcome, started)
        except BastionError as e:
            outcome = error_outcome(e)
            reason = e.reason if isinstance(e, AuthenticationFailed) else e.code.value
            self._count_denial(e, reason)
        except Exception as e:  # a bug must not leak a traceback to the client
            # The operator gets the type and the frames, never the message: a library's message can
            # quote the input ("Found unknown categories [2]"), and no payload may reach a log.
            log.error(
                "unhandled error in %s: %s\n%s",
                route.value,
                type(e).__name__,
                "".join(traceback.format_tb(e.__traceback__)),
            )
            outcome = _fixed_outcome(ErrorCode.INTERNAL_ERROR, "internal error")
            reason = ErrorCode.INTERNAL_ERROR.value
        latency = time.perf_counter() - started
        if self.audit is not None and self.tracing is not None:
            outcome = await self.tracing.audit_write(self._record, route, ctx, outcome, reason, latency)
        elif self.audit is not None:
            outcome = await self._record(route, ctx, outcome, reason, latency)
        model = ctx.model
        if model is not None:
            outcome.headers["x-model-version"] = model.version
            # Only the runtime's own result on traffic the rollout routed (not the status: a client's
            # bad input or its chosen version must not steer a rollback).
            rollback = self.rollouts.observe(
                model.name,
                model.version,
                principal=ctx.principal.id if ctx.principal is not None else "",
                routed=ctx.routed,
                inference_seconds=ctx.inference_seconds,
                rows=ctx.request.rows if ctx.request is not None else 0,
                failed=ctx.runtime_failed,
            )
            if rollback is not None:
                await self._record_rollback(rollback)
        self.drift.observe(ctx, outcome.status, reason, latency)  # copies the admitted rows, O(rows)
        name = model.name if model else ctx.chat.model.name if ctx.chat and ctx.chat.model else UNKNOWN
        self.metrics.observe_request(_ROUTE_VALUE[route], name, outcome.status, latency)
        return outcome

    async def _open_stream(
        self, route: Route, ctx: RequestContext, outcome: Outcome, started: float
    ) -> Outcome:
        """A streamed answer gets two audit records: one committed before its first byte leaves (the
        decision to answer), one when it ends (tokens, the guard's verdict, how it ended), committed
        before its last event: a stream whose closing record fails ends in an error, not [DONE]."""
        chat = ctx.chat
        assert chat is not None and chat.stream is not None
        source = chat.stream
        if self.audit is not None:
            opened = await self._record(route, ctx, outcome, "stream_opened", time.perf_counter() - started)
            if opened.status != 200:
                await source.aclose()  # releases the model's slot and refunds the reserved tokens
                return opened

        async def audited() -> AsyncGenerator[str | StreamEnd, None]:
            status, reason, closed = 499, "client_disconnected", False
            try:
                async for item in source:
                    if isinstance(item, StreamEnd):
                        status, reason, closed = 200, "ok", True
                        await self._close_stream(route, ctx, reason, status, started)
                    yield item
            except BastionError as e:
                status, reason = e.status, e.code.value
                self._count_denial(e, reason)
                if not closed:
                    closed = True
                    await self._close_stream(route, ctx, reason, status, started)
                raise
            finally:
                await source.aclose()  # the model's slot released, unused tokens refunded
                if not closed:  # the client went away mid-stream
                    try:
                        await self._close_stream(route, ctx, reason, status, started)
                    except BastionError:
                        log.error("the closing audit record of a stream the client left was not written")
                model = ctx.chat.model if ctx.chat is not None else None
                self.metrics.observe_request(
                    route.value, model.name if model else UNKNOWN, status, time.perf_counter() - started
                )

        outcome.stream = audited()
        return outcome

    async def _close_stream(
        self, route: Route, ctx: RequestContext, reason: str, status: int, started: float
    ) -> None:
        if self.audit is None:
            return
        closed = await self._record(
            route, ctx, Outcome(status, {}, {}), reason, time.perf_counter() - started, stream_end=True
        )
        if closed.status != status:
            raise AuditUnavailableError("audit log unavailable")

    def _record_event(self, record: dict[str, Any]) -> None:
        """An audit record that is not a request's (a rollback, an incident); the request that
        caused it does not wait for its commit."""
        if self.audit is not None:
            pending = self.audit.submit(record, wait=False)
            assert pending is None

    def _observe_guard(self, model: str, version: str, event: str, value: object) -> None:
        """A model's guard reports: a breaker transition (metrics and an audit event), a timeout, or
        its count of stuck calls (called from the call's thread when it finally returns)."""
        if isinstance(value, Transition):
            self.metrics.breaker_state.labels(model, version).set(STATE_VALUE[value.state])
            self.metrics.breaker_transitions.labels(model, version, value.state.value).inc()
            log.warning("model %s %s: circuit breaker %s (%s)", model, version, value.state, value.reason)
            self._record_event(
                {
                    "ts": self.clock(),
                    "route": "breaker",
                    "action": Action.ADMIN.value,
                    "model": model,
                    "version": version,
                    "decision": value.state.value,  # open | half_open | closed
                    "reason": value.reason,
                    "detail": value.detail,
                }
            )
        elif event == "timeout":
            self.metrics.inference_timeouts.labels(model, version).inc()
        elif event == "stuck" and isinstance(value, int):
            self.metrics.inference_stuck.labels(model, version).set(value)

    async def _record_rollback(self, rollback: Rollback) -> None:
        self.metrics.rollbacks.labels(rollback.model, rollback.reason).inc()
        self.metrics.canary_weight.labels(rollback.model).set(0)
        self._record_event(
            {
                "ts": self.clock(),
                "route": "rollout",
                "action": Action.ADMIN.value,
                "model": rollback.model,
                "version": rollback.version,
                "decision": "rollback",
                "reason": rollback.reason,
                "detail": rollback.detail,
            }
        )

    def _count_denial(self, error: BastionError, reason: str) -> None:
        if self.metrics.enabled:
            self.metrics.denials.labels(error.code.value).inc()
        if isinstance(error, AuthenticationFailed):
            self.metrics.auth_failures.labels(reason).inc()
        elif isinstance(error, RateLimited):
            self.metrics.limited.labels(error.code).inc()
        if isinstance(error, AuthenticationFailed | AuthThrottled):
            self.metrics.failed_auth_addresses.set(self.failed_auth.tracked)

    async def _record(
        self,
        route: Route,
        ctx: RequestContext,
        outcome: Outcome,
        reason: str,
        latency: float,
        *,
        stream_end: bool = False,
    ) -> Outcome:
        assert self.audit is not None
        if ctx.audit_counted:
            # A refusal before identity past its address's allowance: counted into the address's
            # summary record for the window (FailedAuthLimiter), not written on its own.
            self.metrics.refusals_counted.inc()
            return outcome
        model = ctx.model
        record = {
            "ts": ctx.now,
            "request_id": ctx.request_id,
            "route": _ROUTE_VALUE[route],
            "action": _ROUTE_ACTION[route],
            "principal": ctx.principal.id if ctx.principal else None,
            "via": ctx.principal.via if ctx.principal else None,
            # A requested-but-unknown model name is kept (truncated) for forensics: it is a name, not a payload;
            # a key or token pasted there is redacted as in the logs (red team #9 F13).
            "model": model.name if model else (_requested_name(ctx.model_name) if ctx.model_name else None),
            "version": model.version if model else None,
            "digest": model.digest if model else None,
            "decision": "allow" if outcome.status < 400 else "deny",
            "reason": reason,
            "status": outcome.status,
            "latency_ms": round(latency * 1000, 3),
            "payload_hmac": ctx.payload_hmac,
            "output_policy": _DETAIL_VALUE[ctx.output_detail] if ctx.output_detail else None,
            "epsilon_spent": ctx.epsilon_spent,
            "rho_spent": ctx.rho_spent,
            "client": ctx.client,
        }
        if ctx.client_certificate is not None:  # mTLS: its public key's SHA-256 (stable), never the certificate
            record["certificate"] = ctx.client_certificate.public_key_sha256
        if ctx.principal is not None and ctx.principal.token_id is not None:
            record["token"] = ctx.principal.token_id  # the token's jti, never the token
        if ctx.chat is not None:
            record.update(_chat_record(ctx, stream_end=stream_end))
        if ctx.operation is not None:  # an admin's change: what, and to what
            record["target"], record["change"] = ctx.operation
        try:
            pending = self.audit.submit(record, wait=self._wait_for_audit)
            if pending is not None:
                await pending
        except AuditUnavailable:
            # Fail closed: an answer that cannot be audited is not given.
            self.metrics.audit_failures.inc()
            return _fixed_outcome(ErrorCode.AUDIT_UNAVAILABLE, "audit log unavailable")
        return outcome


def _chat_record(ctx: RequestContext, *, stream_end: bool) -> dict[str, Any]:
    """What a language-model request adds to its audit record: names, digests and counts, never a
    message, the prompt's text or the answer."""
    chat = ctx.chat
    assert chat is not None
    model = chat.model
    prompt = model.prompt if model is not None else None
    record: dict[str, Any] = {
        "model": model.name if model is not None else chat.request.model[:64],
        "prompt": prompt.name if prompt else None,
        "prompt_digest": prompt.digest if prompt else None,
        "stream": chat.request.stream,
        "max_tokens": chat.max_tokens or None,
        "prompt_tokens": chat.usage.prompt_tokens if chat.usage else chat.prompt_tokens or None,
        "completion_tokens": chat.usage.completion_tokens if chat.usage else None,
        "tokens_charged": chat.tokens_reserved or None,
        "guard": chat.guard,
        "guard_score": chat.guard_score,
        "intent_score": chat.intent.score if chat.intent else None,
        "intent_signals": list(chat.intent.signals) if chat.intent else None,
        "redactions": dict(chat.redactions) or None,
        "user_digest": user_digest(chat.request.user),
    }
    if chat.request.stream:
        record["stream_event"] = "end" if stream_end else "open"
    return record


class AuditUnavailableError(BastionError):
    code = ErrorCode.AUDIT_UNAVAILABLE


def error_outcome(error: BastionError) -> Outcome:
    headers: dict[str, str] = {}
    if isinstance(error, AuthenticationFailed):
        headers["WWW-Authenticate"] = 'Bearer realm="bastion"'
    if isinstance(error, RateLimited | ModelCircuitOpen | ModelOverloaded):
        headers["Retry-After"] = str(max(1, int(error.retry_after + 0.999)))
    if isinstance(error, MethodNotAllowed):
        headers["Allow"] = error.allowed
    return Outcome(error.status, {"error": error.message, "code": error.code}, headers)


def _fixed_outcome(code: ErrorCode, message: str) -> Outcome:
    """An answer the server gives without an exception of the request's (its own failure)."""
    return Outcome(HTTP_STATUS[code], {"error": message, "code": code}, {})


def _requested_name(name: str) -> str:
    """A model name the caller asked for, for the audit record: at most 64 characters, with anything
    shaped like a credential (an API key, a JWT) redacted, as in the logs."""
    from bastion.logs import redact

    return redact(name[:256])[:64]
