"""The Bastion service: builds every part from the config and runs one request through its pipeline.

The order of the defenses is here, in `build_pipelines`, and nowhere else. The
audit write is the outer layer of `handle`, so no path through any stage can
skip it, and in "sync" durability the response waits for the record's commit.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bastion.audit import AuditLog
from bastion.audit.chain import load_or_create_audit_key
from bastion.audit.log import AuditUnavailable
from bastion.config import Action, Config, check_grants_name_models, load_config
from bastion.context import RequestContext
from bastion.errors import (
    HTTP_STATUS,
    AuthenticationFailed,
    AuthThrottled,
    BastionError,
    ConfigError,
    ErrorCode,
    MethodNotAllowed,
    NotReady,
    RateLimited,
)
from bastion.files import write_private_file
from bastion.isolation import IsolationStore
from bastion.keys import KeyStore
from bastion.metrics import UNKNOWN, Metrics
from bastion.policy import Policy
from bastion.privacy import AnswerCache, NoiseSource, OpenDPNoise
from bastion.registry import ModelRegistry
from bastion.rollout import Rollback, Rollouts
from bastion.routes import ROUTE_ACTIONS, Route
from bastion.stages import Stage
from bastion.stages.address_limits import FailedAuthLimiter, FailedAuthPolicy, ThrottleFailedAuth
from bastion.stages.aggregates import AggregateSource, ComputeAggregates
from bastion.stages.authorization import AuthorizeModel, AuthorizeServer
from bastion.stages.endpoints import (
    DescribeApi,
    DescribeModel,
    DescribeServer,
    ExportMetrics,
    IssueToken,
    ModelReadiness,
    RouteNotFound,
    WrongMethod,
)
from bastion.stages.identity import Authenticate
from bastion.stages.inference import Infer
from bastion.stages.input_guard import DecodeRequest, GuardInput
from bastion.stages.limits import EnforceLimits
from bastion.stages.output_policy import PrivateScores, ShapeOutput
from bastion.stages.query_audit import Containment, ContainmentGate, IsolationGate, WatchQueries
from bastion.state import MemoryStateStore, SQLiteStateStore, StateStore
from bastion.statedir import StatePaths, lock_state_dir
from bastion.tokens import TokenAuthority, load_or_create_signing_key

log = logging.getLogger("bastion")


def load_or_create_secret(path: Path, size: int = 32) -> bytes:
    if path.exists():
        return path.read_bytes()
    secret = secrets.token_bytes(size)
    write_private_file(path, secret)
    return secret


@dataclass(slots=True)
class Outcome:
    status: int
    body: dict[str, Any] | bytes
    headers: dict[str, str]


class Bastion:
    def __init__(
        self,
        config: Config,
        *,
        config_path: Path = Path("bastion.toml"),
        unsafe_no_defenses: bool = False,
        clock: Callable[[], float] = time.time,
        noise: NoiseSource | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self._reloading = False
        self._closed = False
        self.clock = clock
        self.unsafe_no_defenses = unsafe_no_defenses
        paths = StatePaths(config.server.state_dir)
        paths.root.mkdir(parents=True, exist_ok=True)
        paths.root.chmod(0o700)
        self.paths = paths
        # First, before any database in the directory is opened: a second server touches nothing.
        self._state_lock = lock_state_dir(paths.root)
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
        check_grants_name_models(
            config, self.registry.configured_names, config_path, regressors=self.registry.regressors
        )
        self.policy = Policy.from_config(config)
        self.metrics = Metrics(enabled=config.metrics.enabled)
        self.metrics.models_loaded.set(len(self.registry.models()))
        self.metrics.models_refused.set(len(self.registry.failures))
        self.keys = KeyStore(paths.keys)
        self.isolation = IsolationStore(paths.isolation)
        self.tokens = TokenAuthority(
            load_or_create_signing_key(paths.token_key),
            issuer=config.tokens.issuer,
            audience=config.tokens.audience,
            default_ttl=config.tokens.ttl_seconds,
        )
        self.state = _state_store(config, paths)
        self.audit: AuditLog | None = None
        if unsafe_no_defenses:
            log.warning("UNSAFE: serving with every defense off (benchmark baseline only)")
        else:
            a = config.audit
            self.audit = AuditLog(
                paths.audit,
                load_or_create_audit_key(paths.audit_key),
                checkpoint_every_records=a.checkpoint_every_records,
                checkpoint_every_seconds=a.checkpoint_every_seconds,
                fsync=a.fsync,
                flush_delay=0.0 if a.durability == "sync" else 0.005,
                clock=clock,
            )
        self._wait_for_audit = config.audit.durability == "sync"
        self.private_scores = PrivateScores(self.state, noise or OpenDPNoise(), AnswerCache())
        self.private_scores.on_global_spend = lambda model, unit, left: self.metrics.global_privacy.labels(
            model, unit
        ).set(left)
        self.rollouts = self._rollouts(config, config_path)
        self._hmac_key = load_or_create_secret(paths.hmac_key)
        # Kept across reloads (a SIGHUP must not forgive an address); its policy follows the config.
        self.failed_auth = FailedAuthLimiter(
            failed_auth_policy(config), record=self._record_event, clock=clock
        )
        self.pipelines = self.build_pipelines(self._hmac_key)

    def build_pipelines(self, hmac_key: bytes) -> dict[Route, list[Stage]]:
        """The order of the defenses, per route. Read top to bottom."""
        limits = self.config.limits
        decode = DecodeRequest(limits.max_body_bytes)
        if self.unsafe_no_defenses:
            return {Route.INFER: [_ResolveWithoutPolicy(self.registry), decode, Infer(), ShapeOutput()]}
        self.failed_auth.policy = failed_auth_policy(self.config)
        # 0. before identity: an address that failed authentication too often is refused unchecked; 429
        authenticate = ThrottleFailedAuth(self.failed_auth, Authenticate(self.keys, self.tokens))
        gate = ContainmentGate()
        limit = EnforceLimits(self.state, self.policy)
        watch = WatchQueries(Containment(self.keys, self.isolation, self.metrics, self._record_event))
        isolated = IsolationGate(self.isolation)
        guard = GuardInput(max_rows=limits.max_rows, hmac_key=hmac_key, on_out_of_distribution=watch.refused)

        def on_model(action: Action) -> AuthorizeModel:
            return AuthorizeModel(self.policy, self.registry, action, self.rollouts.pick)

        return {
            Route.INFER: [
                authenticate,  # 1. identity: key or token; 401
                gate,  # 2. containment: a quarantined key is refused; 403
                limit,  # 3. rate limit and daily quota; 429
                on_model(Action.INFER),  # 4. model exists (404) and is granted (403)
                isolated,  # 4b. a model isolated by query auditing answers nobody; 503
                decode,  # 5. body size (413) and well-formed V2 JSON (400)
                guard,  # 6. manifest schema, out-of-distribution screen; 422/413/403
                watch,  # 7. query auditing: extraction suspected -> incident, key quarantined; 403
                Infer(),  # 8. the runtime
                # 9. output policy per grant (label, top-k, rounding, reverse sigmoid, DP noise under a
                #    budget with the keyed answer cache); 403 for an ungranted output, 429 over budget
                ShapeOutput(self.private_scores),
            ],
            # DP statistics over a batch: the same guard and model, then counts and sums with noise.
            Route.AGGREGATE: [
                authenticate,
                gate,
                limit,
                on_model(Action.AGGREGATE),
                isolated,
                AggregateSource(limits.max_body_bytes),
                guard,
                watch,
                Infer(),
                ComputeAggregates(
                    self.state,
                    self.private_scores.noise,
                    self.private_scores.cache,
                    self.private_scores.on_global_spend,
                ),
            ],
            Route.MODEL_METADATA: [
                authenticate,
                gate,
                limit,
                on_model(Action.METADATA),
                DescribeModel(self.registry, self.state),
            ],
            Route.MODEL_READY: [authenticate, gate, limit, on_model(Action.METADATA), ModelReadiness()],
            Route.SERVER_METADATA: [authenticate, gate, limit, DescribeServer()],
            Route.OPENAPI: [authenticate, gate, limit, DescribeApi()],
            # Only an API key can mint a token: a stolen token cannot renew itself.
            Route.TOKEN: [
                ThrottleFailedAuth(
                    self.failed_auth, Authenticate(self.keys, self.tokens, allow_tokens=False)
                ),
                gate,
                limit,
                IssueToken(self.tokens, self.policy),
            ],
            # [metrics] enabled = false: no such route, for every caller (after authentication).
            Route.METRICS: [
                authenticate,
                gate,
                limit,
                AuthorizeServer(self.policy, Action.ADMIN),
                ExportMetrics(self.metrics),
            ]
            if self.metrics.enabled
            else [authenticate, RouteNotFound()],
            # Unknown paths and wrong methods answer 401 before 404/405: nothing to map anonymously.
            Route.NOT_FOUND: [authenticate, RouteNotFound()],
            Route.WRONG_METHOD: [authenticate, WrongMethod()],
        }

    def _rollouts(self, config: Config, config_path: Path) -> Rollouts:
        known = self.registry.configured_names
        for model in config.rollouts:
            if model not in known:
                raise ConfigError(f"{config_path}: rollouts.{model}: model {model!r} is not configured")
        rollouts = Rollouts(
            dict(config.rollouts),
            self.paths.root / "rollouts.json",
            served=lambda name, version: (
                version in {m.version for m in self.registry.models() if m.name == name}
            ),
            clock=self.clock,
        )
        for model, state in rollouts.states.items():
            self.metrics.canary_weight.labels(model).set(state.weight)
        return rollouts

    async def startup(self) -> None:
        await self._audit_load_events(self.registry)

    async def reload(self) -> None:
        """Re-read the policy file and re-verify the models, then switch over in one step.

        Models, roles, rollouts and request limits take effect; requests already running finish
        with the pipeline and model they started with. If anything fails, the previous
        configuration keeps serving. (Server, state, audit and token settings need a restart.)
        """
        if self._reloading:
            return
        self._reloading = True
        try:
            config = load_config(self.config_path)
            registry = await asyncio.get_running_loop().run_in_executor(
                None, ModelRegistry.load, list(config.models)
            )
            check_grants_name_models(
                config, registry.configured_names, self.config_path, regressors=registry.regressors
            )
            previous = (self.registry, self.policy, self.rollouts, self.config)
            self.registry, self.policy, self.config = registry, Policy.from_config(config), config
            try:
                self.rollouts = self._rollouts(config, self.config_path)
            except ConfigError:
                self.registry, self.policy, self.rollouts, self.config = previous
                raise
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

    @property
    def ready(self) -> bool:
        audit_ok = self.audit is None or self.audit.healthy
        return audit_ok and not self.registry.failures and bool(self.registry.models())

    async def is_ready(self) -> bool:
        """Ready, and the state store answers: a replica whose Redis is gone takes no traffic."""
        return self.ready and await self.state.reachable()

    def close(self) -> None:
        """Flush and close everything; safe to call twice (lifespan shutdown, then the CLI's finally)."""
        if self._closed:
            return
        self._closed = True
        if self.audit is not None:
            self.failed_auth.flush(self.clock())  # the summaries of windows still open
            self.audit.close()
        self.state.close()
        self.keys.close()
        self.isolation.close()
        self._state_lock.release()

    async def aclose(self) -> None:
        """The server's shutdown, on its event loop. The state store goes first: it waits for the
        blocks being leased in the background, so that those too are given back."""
        if not self._closed:
            await self.state.aclose()
            self.close()

    async def handle(self, route: Route, ctx: RequestContext) -> Outcome:
        started = time.perf_counter()
        reason = "ok"
        try:
            stages = self.pipelines.get(route)
            if stages is None:
                raise NotReady("route disabled", code=ErrorCode.ROUTE_DISABLED)
            for stage in stages:
                await stage(ctx)
            outcome = Outcome(200, ctx.result_text if ctx.result_text is not None else ctx.result or {}, {})
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
        if self.audit is not None:
            outcome = await self._record(route, ctx, outcome, reason, latency)
        model = ctx.model
        if model is not None:
            outcome.headers["x-model-version"] = model.version
            # Only the runtime's own result on traffic the rollout routed (not the status: a client's
            # bad input or its chosen version must not steer a rollback).
            rollback = self.rollouts.observe(
                model.name,
                model.version,
                routed=ctx.routed,
                inference_seconds=ctx.inference_seconds,
                failed=ctx.runtime_failed,
            )
            if rollback is not None:
                await self._record_rollback(rollback)
        self.metrics.observe_request(route.value, model.name if model else UNKNOWN, outcome.status, latency)
        return outcome

    def _record_event(self, record: dict[str, Any]) -> None:
        """An audit record that is not a request's (a rollback, an incident); the request that
        caused it does not wait for its commit."""
        if self.audit is not None:
            pending = self.audit.submit(record, wait=False)
            assert pending is None

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
        if isinstance(error, AuthenticationFailed):
            self.metrics.auth_failures.labels(reason).inc()
        elif isinstance(error, RateLimited):
            self.metrics.limited.labels(error.code).inc()
        if isinstance(error, AuthenticationFailed | AuthThrottled):
            self.metrics.failed_auth_addresses.set(self.failed_auth.tracked)

    async def _record(
        self, route: Route, ctx: RequestContext, outcome: Outcome, reason: str, latency: float
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
            "route": route.value,
            "action": ROUTE_ACTIONS[route].value,
            "principal": ctx.principal.id if ctx.principal else None,
            "via": ctx.principal.via if ctx.principal else None,
            # A requested-but-unknown model name is kept (truncated) for forensics: it is a name, not a payload.
            "model": model.name if model else (ctx.model_name[:64] if ctx.model_name else None),
            "version": model.version if model else None,
            "digest": model.digest if model else None,
            "decision": "allow" if outcome.status < 400 else "deny",
            "reason": reason,
            "status": outcome.status,
            "latency_ms": round(latency * 1000, 3),
            "payload_hmac": ctx.payload_hmac,
            "output_policy": ctx.output_detail.value if ctx.output_detail else None,
            "epsilon_spent": ctx.epsilon_spent,
            "rho_spent": ctx.rho_spent,
            "client": ctx.client,
        }
        try:
            pending = self.audit.submit(record, wait=self._wait_for_audit)
            if pending is not None:
                await pending
        except AuditUnavailable:
            # Fail closed: an answer that cannot be audited is not given.
            self.metrics.audit_failures.inc()
            return _fixed_outcome(ErrorCode.AUDIT_UNAVAILABLE, "audit log unavailable")
        return outcome


def failed_auth_policy(config: Config) -> FailedAuthPolicy:
    limits = config.limits
    return FailedAuthPolicy(
        rate=limits.failed_auth_rate,
        burst=limits.failed_auth_burst,
        ipv6_prefix=limits.failed_auth_ipv6_prefix,
        max_addresses=limits.failed_auth_max_addresses,
        audited_per_window=limits.refusals_audited_per_window,
        audited_total_per_window=limits.refusals_audited_total_per_window,
        window_seconds=limits.refusal_window_seconds,
    )


def _state_store(config: Config, paths: StatePaths) -> StateStore:
    if config.state.backend == "redis":
        from bastion.state.redis import RedisStateStore

        return RedisStateStore(config.state.redis_url, prefix=config.state.redis_prefix)
    if config.state.backend == "postgres":
        from bastion.state.postgres import PostgresStateStore

        return PostgresStateStore(config.state.postgres_dsn, table=config.state.postgres_table)
    if config.state.backend == "sqlite":
        return SQLiteStateStore(paths.limits)
    return MemoryStateStore()


def error_outcome(error: BastionError) -> Outcome:
    headers: dict[str, str] = {}
    if isinstance(error, AuthenticationFailed):
        headers["WWW-Authenticate"] = 'Bearer realm="bastion"'
    if isinstance(error, RateLimited):
        headers["Retry-After"] = str(max(1, int(error.retry_after + 0.999)))
    if isinstance(error, MethodNotAllowed):
        headers["Allow"] = error.allowed
    return Outcome(error.status, {"error": error.message, "code": error.code}, headers)


def _fixed_outcome(code: ErrorCode, message: str) -> Outcome:
    """An answer the server gives without an exception of the request's (its own failure)."""
    return Outcome(HTTP_STATUS[code], {"error": message, "code": code}, {})


class _ResolveWithoutPolicy:
    """Benchmark baseline only: find the model and grant everything."""

    def __init__(self, registry: ModelRegistry) -> None:
        self._registry = registry

    async def __call__(self, ctx: RequestContext) -> None:
        from bastion.config import OutputDetail
        from bastion.policy import EffectiveGrant

        assert ctx.model_name is not None
        ctx.model = self._registry.get(ctx.model_name, ctx.model_version)
        ctx.grant = EffectiveGrant(frozenset(Action), OutputDetail.PROBABILITIES, True)
        ctx.output_detail = OutputDetail.PROBABILITIES
