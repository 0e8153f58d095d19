"""Building Bastion from its policy file: config -> parts -> the pipelines, per route.

`bastion.service.Bastion` opens the parts (state, audit, keys, models) and runs requests;
what each route's pipeline is, in which order the defenses run, is written here once, as data,
in `build_pipelines`. The audit write is not a stage: it is the outer layer of
`Bastion.handle`, so no pipeline can leave it out.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from bastion.breaker import ModelGuards
from bastion.certs import CertificateIdentities
from bastion.config import Action, Config
from bastion.containment import MeasureRecords
from bastion.context import RequestContext
from bastion.dashboard.summary import build_summary
from bastion.files import write_private_file
from bastion.incidents import IncidentRecords
from bastion.isolation import IsolationRecords
from bastion.keys import KeyRecords
from bastion.llm.intent import ExtractionTracker
from bastion.llm.models import ChatModel
from bastion.metrics import Metrics
from bastion.policy import Policy
from bastion.query_history import SharedHistories, SharedLedgers, SharedTracker, open_histories
from bastion.registry import ModelRegistry
from bastion.rollout import Rollouts
from bastion.routes import Route
from bastion.sessions import SessionAuthority
from bastion.stages import Stage
from bastion.stages.address_limits import FailedAuthLimiter, FailedAuthPolicy, ThrottleFailedAuth
from bastion.stages.admin import (
    ListIncidents,
    NoteIncident,
    ReleaseKey,
    ReleaseModel,
    RevokeKeyTokens,
    RevokeToken,
    ShowIncident,
    TransitionIncident,
)
from bastion.stages.aggregates import AggregateSource, ComputeAggregates
from bastion.stages.authorization import AuthorizeModel, AuthorizeServer
from bastion.stages.chat import (
    AuthorizeChat,
    ChatPolicy,
    ComposeChat,
    DecodeChat,
    DescribeChatModel,
    Generate,
    LazyRedactor,
    ListChatModels,
    PromptContainment,
    ReserveTokens,
    WatchPrompts,
)
from bastion.stages.dashboard import CloseSession, OpenSession, ServeDashboard, Summarize
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
from bastion.stages.query_audit import (
    ApplyMeasures,
    Containment,
    ContainmentGate,
    IsolationGate,
    WatchQueries,
)
from bastion.state import MemoryStateStore, SQLiteStateStore, StateStore
from bastion.statedir import StatePaths
from bastion.tokens import TokenAuthority


class PipelineParts(Protocol):
    """The parts a pipeline is built from (`Bastion` holds them; reload swaps the first four)."""

    config: Config
    registry: ModelRegistry
    policy: Policy
    rollouts: Rollouts
    metrics: Metrics
    keys: KeyRecords
    isolation: IsolationRecords
    incidents: IncidentRecords
    measures: MeasureRecords
    # The dashboard's sessions, in the deployment's store (bastion.sessions): kept across policy
    # reloads and restarts, shared by workers and replicas; ended on logout and with their key.
    sessions: SessionAuthority
    tokens: TokenAuthority
    state: StateStore
    private_scores: PrivateScores
    failed_auth: FailedAuthLimiter
    over_limit: FailedAuthLimiter
    unsafe_no_defenses: bool
    chat_models: dict[str, ChatModel]
    extraction_tracker: ExtractionTracker
    # Query auditing's per-principal histories in the state backend (workers, replicas); None: in process.
    histories: SharedHistories | None
    redactor: LazyRedactor
    guards: ModelGuards  # each model version's deadline, threads and circuit breaker
    started: int  # when the server started, in Unix seconds (the `created` of /v1/models entries)


def build_pipelines(
    parts: PipelineParts, hmac_key: bytes, *, record_event: Callable[[dict[str, Any]], None]
) -> dict[Route, list[Stage]]:
    """The order of the defenses, per route. Read top to bottom.

    `record_event` submits an audit record that is not a request's (incidents, refusal summaries).
    """
    limits = parts.config.limits
    decode = DecodeRequest(limits.max_body_bytes)
    if parts.unsafe_no_defenses:
        return {Route.INFER: [_ResolveWithoutPolicy(parts.registry), decode, Infer(), ShapeOutput()]}
    parts.failed_auth.policy = parts.over_limit.policy = failed_auth_policy(parts.config)
    # 0. before identity: an address that failed authentication too often is refused unchecked; 429
    # 1. identity: a key, a token, or a client certificate the policy maps (mTLS; not on the token and
    # session routes: a service identity mints no token and opens no dashboard session).
    certificates = CertificateIdentities.from_config(parts.config)
    authenticate = ThrottleFailedAuth(
        parts.failed_auth, Authenticate(parts.keys, parts.tokens, certificates=certificates)
    )
    gate = ContainmentGate()
    limit = EnforceLimits(parts.state, parts.policy, parts.over_limit)
    watch = WatchQueries(
        Containment(
            parts.keys, parts.isolation, parts.metrics, record_event, parts.incidents, parts.measures
        ),
        parts.histories,
    )
    isolated = IsolationGate(parts.isolation)
    # The containment ladder's timed steps on this principal and model (throttle, degrade, reroute).
    measured = ApplyMeasures(parts.measures, parts.state, parts.rollouts.stable, parts.registry)
    guard = GuardInput(max_rows=limits.max_rows, hmac_key=hmac_key, on_out_of_distribution=watch.refused)

    def on_model(action: Action) -> AuthorizeModel:
        return AuthorizeModel(parts.policy, parts.registry, action, parts.rollouts.pick)

    sessions = parts.sessions
    revocations = parts.tokens.revocations
    assert revocations is not None, "the service's token authority keeps a deny list"
    # The dashboard and /v2/admin/*: a key, a token, or the dashboard's session cookie.
    authenticate_admin = ThrottleFailedAuth(
        parts.failed_auth, Authenticate(parts.keys, parts.tokens, sessions=sessions, certificates=certificates)
    )
    admin = AuthorizeServer(parts.policy, Action.ADMIN)

    def summary(now: float) -> Awaitable[dict[str, Any]]:
        return build_summary(
            metrics=parts.metrics,
            incidents=parts.incidents,
            keys=parts.keys,
            registry=parts.registry,
            isolation=parts.isolation,
            measures=parts.measures,
            rollouts=parts.rollouts,
            roles=parts.config.roles,
            store=parts.state,
            now=now,
        )

    chat_models = parts.chat_models
    shared = parts.histories.store if parts.histories is not None else None
    watch_prompts = WatchPrompts(
        parts.extraction_tracker,
        PromptContainment(parts.keys, parts.metrics, record_event, parts.extraction_tracker, parts.incidents),
        None if shared is None else SharedTracker(parts.extraction_tracker, shared),
    )

    return {
        Route.INFER: [
            authenticate,  # 1. identity: key or token; 401
            gate,  # 2. containment: a quarantined key is refused; 403
            limit,  # 3. rate limit and daily quota; 429
            on_model(Action.INFER),  # 4. model exists (404) and is granted (403)
            isolated,  # 4b. a model isolated by query auditing answers nobody; 503
            decode,  # 5. body size (413) and well-formed V2 JSON (400)
            measured,  # 5b. containment in force: throttled in rows (429), degraded or rerouted
            guard,  # 6. manifest schema, out-of-distribution screen; 422/413/403
            watch,  # 7. query auditing: extraction suspected -> incident, key quarantined; 403
            Infer(parts.guards),  # 8. the runtime, under its deadline (504) and circuit breaker (503)
            # 9. output policy per grant (label, top-k, rounding, reverse sigmoid, DP noise under a
            #    budget with the keyed answer cache); 403 for an ungranted output, 429 over budget
            ShapeOutput(parts.private_scores),
        ],
        # DP statistics over a batch: the same guard and model, then counts and sums with noise.
        Route.AGGREGATE: [
            authenticate,
            gate,
            limit,
            on_model(Action.AGGREGATE),
            isolated,
            AggregateSource(limits.max_body_bytes),
            measured,
            guard,
            watch,
            Infer(parts.guards),
            ComputeAggregates(parts.private_scores),
        ],
        # Language models (/v1, OpenAI-compatible).
        Route.CHAT: [
            authenticate,
            gate,
            limit,
            DecodeChat(ChatPolicy(parts.policy, limits.max_body_bytes)),  # 4. the role's byte cap; 400/413
            AuthorizeChat(parts.policy, chat_models),  # 5. a served language model (404), granted (403)
            # 6. the role's caps on messages and max_tokens, a client system message refused or
            #    demoted, PII and secrets redacted, the context checked; 400/403/413
            ComposeChat(parts.redactor),
            watch_prompts,  # 7. prompt-extraction auditing -> incident, key quarantined; 403
            ReserveTokens(parts.state),  # 8. the principal's token budget; 429
            # 9. the model behind the protected prompt and its canary; the leakage guard reads every
            #    answer before a byte leaves (403 output_withheld); unused tokens refunded
            Generate(
                parts.state,
                watch_prompts,
                parts.redactor,
                parts.metrics,
                None if shared is None else SharedLedgers(shared),
            ),
        ],
        # Operators: incidents and releases, the dashboard (admin grant; each change audited).
        **{
            route: [authenticate_admin, gate, limit, admin, stage]
            for route, stage in (
                (Route.INCIDENTS, ListIncidents(parts.incidents)),
                (Route.INCIDENT, ShowIncident(parts.incidents)),
                (Route.INCIDENT_TRANSITION, TransitionIncident(parts.incidents)),
                (Route.INCIDENT_NOTE, NoteIncident(parts.incidents)),
                (Route.KEY_RELEASE, ReleaseKey(parts.keys, parts.measures, parts.incidents)),
                (Route.MODEL_RELEASE, ReleaseModel(parts.isolation, parts.incidents)),
                (Route.TOKEN_REVOKE, RevokeToken(revocations)),
                (Route.KEY_TOKENS_REVOKE, RevokeKeyTokens(revocations)),
                (Route.SESSION_LOGOUT, CloseSession(sessions)),
                (Route.SUMMARY, Summarize(summary)),
                (Route.DASHBOARD, ServeDashboard()),
            )
        },
        # A session is opened with an API key only: not a token, not another session.
        Route.SESSION: [
            ThrottleFailedAuth(parts.failed_auth, Authenticate(parts.keys, parts.tokens, allow_tokens=False)),
            gate,
            limit,
            admin,
            OpenSession(sessions),
        ],
        Route.CHAT_MODELS: [
            authenticate,
            gate,
            limit,
            ListChatModels(parts.policy, chat_models, parts.started),
        ],
        Route.CHAT_MODEL: [
            authenticate,
            gate,
            limit,
            DescribeChatModel(parts.policy, chat_models, parts.started),
        ],
        Route.MODEL_METADATA: [
            authenticate,
            gate,
            limit,
            on_model(Action.METADATA),
            DescribeModel(parts.registry, parts.state, parts.private_scores.global_budgets),
        ],
        Route.MODEL_READY: [authenticate, gate, limit, on_model(Action.METADATA), ModelReadiness(parts.guards)],
        Route.SERVER_METADATA: [authenticate, gate, limit, DescribeServer()],
        Route.OPENAPI: [authenticate, gate, limit, DescribeApi()],
        # Only an API key can mint a token: a stolen token cannot renew itparts.
        Route.TOKEN: [
            ThrottleFailedAuth(parts.failed_auth, Authenticate(parts.keys, parts.tokens, allow_tokens=False)),
            gate,
            limit,
            IssueToken(parts.tokens, parts.policy, parts.registry),
        ],
        # [metrics] enabled = false: no such route, for every caller (after authentication).
        Route.METRICS: [
            authenticate,
            gate,
            limit,
            AuthorizeServer(parts.policy, Action.ADMIN),
            ExportMetrics(parts.metrics, parts.incidents),
        ]
        if parts.metrics.enabled
        else [authenticate, RouteNotFound()],
        # Unknown paths and wrong methods answer 401 before 404/405: nothing to map anonymously.
        Route.NOT_FOUND: [authenticate, RouteNotFound()],
        Route.WRONG_METHOD: [authenticate, WrongMethod()],
    }


def load_or_create_secret(path: Path, size: int = 32) -> bytes:
    if path.exists():
        return path.read_bytes()
    secret = secrets.token_bytes(size)
    write_private_file(path, secret)
    return secret


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


def open_query_histories(config: Config, paths: StatePaths, *, worker: bool) -> SharedHistories | None:
    """Query auditing's histories in `state.backend` (bastion.query_history); None keeps them in this
    process: "memory", and "sqlite" for a server without workers (no other process can share them)."""
    s = config.state
    if s.backend == "sqlite" and not worker:
        return None
    return open_histories(
        s.backend,
        path=paths.root / "histories.db",
        redis_url=s.redis_url,
        redis_prefix=s.redis_prefix,
        postgres_dsn=s.postgres_dsn,
        postgres_table=s.postgres_table,
    )


def open_state_store(config: Config, paths: StatePaths) -> StateStore:
    if config.state.backend == "redis":
        from bastion.state.redis import RedisStateStore

        return RedisStateStore(config.state.redis_url, prefix=config.state.redis_prefix)
    if config.state.backend == "postgres":
        from bastion.state.postgres import PostgresStateStore

        return PostgresStateStore(config.state.postgres_dsn, table=config.state.postgres_table)
    if config.state.backend == "sqlite":
        return SQLiteStateStore(paths.limits)
    return MemoryStateStore()


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
