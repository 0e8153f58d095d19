"""What one request carries through the pipeline. Transport-neutral: no HTTP here."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from bastion.config import Action, ChatLimits, OutputDetail
from bastion.llm.types import ChatMessage, Completion, StreamEnd, Usage
from bastion.policy import EffectiveGrant, TokenScope
from bastion.registry import ServedModel
from bastion.sessions import IssuedSession, Session

if TYPE_CHECKING:
    from bastion.certs import ClientCertificate
    from bastion.llm.intent import IntentVerdict
    from bastion.llm.models import ChatModel
    from bastion.llm.protocol import ChatRequest


@dataclass(frozen=True, slots=True)
class SessionCredentials:
    """A dashboard session as the transport received it: the cookie's value, the CSRF header, and
    whether the request changes state (only a safe method may go without the CSRF secret)."""

    cookie: str
    csrf_token: str | None
    state_changing: bool
    cross_site: bool = False  # the browser said so (Sec-Fetch-Site: cross-site or same-site)
    # Further cookies of the same name, in the order sent (a few at most): a page on another port of
    # the host can set one with a longer Path, which the browser sends first. Each is tried in turn.
    others: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Principal:
    key_id: str
    roles: tuple[str, ...]
    scope: TokenScope | None = None  # set when the caller used a token: it narrows the key's grants
    via: str = "key"  # "key" | "token" | "session" (the dashboard's cookie) | "certificate" (mTLS)
    quarantined: bool = False  # query auditing suspected extraction; the containment gate refuses it
    # via "certificate": the SHA-256 of the client certificate's public key (audited; never the certificate),
    # and key_id is the principal id itself, "cert:<name>" (the key store keeps its quarantine under it).
    certificate: str | None = None
    token_id: str | None = None  # via "token": the token's jti (audited; what an admin revokes it by)

    @property
    def id(self) -> str:
        return self.key_id if self.via == "certificate" else f"key:{self.key_id}"


BINARY_ALL = "*"  # in InferRequest.binary_outputs: every output of the answer


@dataclass(slots=True)
class InferRequest:
    """A decoded Open Inference Protocol V2 request: tensors by name, ready for the runtime."""

    id: str | None
    inputs: dict[str, np.ndarray]
    requested_outputs: list[str] | None
    parameters: dict[str, Any]
    rows: int
    # Outputs the caller asked to receive as raw bytes (the binary tensor extension; BINARY_ALL for
    # all): only the transport's encoding of the answer reads it, never a policy decision.
    binary_outputs: frozenset[str] = frozenset()


@dataclass(slots=True)
class RequestContext:
    """One request on its way through a pipeline.

    The transport's fields come first and are the only ones its constructor takes; every field
    after them is a stage's result (`init=False`), so no transport can hand the pipeline a
    decision such as `rows_from_signed_reference`. Each result field names the stage that sets it.
    """

    # The transport's part: what arrived, set when the context is built.
    request_id: str
    action: Action
    now: float  # wall-clock seconds, read once per request
    credentials: str | None  # the Authorization header value; never logged
    read_body: Callable[[int], Awaitable[bytes]]
    # The transport's decoder for an inference body (V2 JSON when None): REST's binary tensor
    # extension and gRPC bring their own, and every stage after decoding sees the same InferRequest.
    decode: Callable[[bytes], InferRequest] | None = None
    client: str | None = None
    model_name: str | None = None
    model_version: str | None = None
    # The methods the path answers (the Allow header), for a request with the wrong one (WrongMethod).
    allowed_methods: str | None = None
    resource_id: str | None = None  # an incident's or a key's id in the path (admin routes)
    # A dashboard session's cookie and CSRF header, passed only on the routes that accept a session.
    session: SessionCredentials | None = None
    # The caller's W3C `traceparent` (REST header, gRPC metadata), as sent; read only by bastion.tracing,
    # which ignores a malformed one.
    traceparent: str | None = None
    # The client certificate the TLS layer verified (mTLS, bastion.tls), read by identity only.
    client_certificate: ClientCertificate | None = None

    # The pipeline's part, one writer each.
    principal: Principal | None = field(default=None, init=False)  # Authenticate
    # ThrottleFailedAuth: a refusal before identity past its address's allowance, counted into the
    # address's summary record instead of written on its own.
    audit_counted: bool = field(default=False, init=False)
    model: ServedModel | None = field(default=None, init=False)  # AuthorizeModel
    grant: EffectiveGrant | None = field(default=None, init=False)  # AuthorizeModel
    output_detail: OutputDetail | None = field(default=None, init=False)  # AuthorizeModel: the grant's
    # AuthorizeModel: True when the rollout chose the version (an unversioned request): only such
    # traffic is evidence about a canary. A request naming its version chose it itself, and could
    # steer a rollback.
    routed: bool = field(default=False, init=False)
    body: bytes | None = field(default=None, init=False)  # DecodeRequest
    request: InferRequest | None = field(default=None, init=False)  # DecodeRequest, AggregateSource
    # AggregateSource's reference branch only: the rows are the bundle's own signed reference data,
    # so the input guard and query auditing skip them. Nothing a client sends can set it.
    rows_from_signed_reference: bool = field(default=False, init=False)
    payload_hmac: str | None = field(default=None, init=False)  # GuardInput (AggregateSource: reference)
    # GuardInput's out-of-distribution screen: the rows in the reference data's whitened space and
    # their squared distances to its centre, measured once and reused by query auditing.
    measured: tuple[np.ndarray, list[float]] | None = field(default=None, init=False)
    # Infer: (rows, classes) probabilities, or (rows, 1) values; the runtime's own time for this batch
    # in seconds (None: it never ran), and whether it raised (the server's failure, not the client's).
    prediction: np.ndarray | None = field(default=None, init=False)
    inference_seconds: float | None = field(default=None, init=False)
    runtime_failed: bool = field(default=False, init=False)
    # ShapeOutput / ComputeAggregates / an endpoint: the answer, and the privacy spent on it (audited).
    epsilon_spent: float | None = field(default=None, init=False)
    rho_spent: float | None = field(default=None, init=False)
    result: dict[str, Any] | None = field(default=None, init=False)  # the JSON response body
    result_text: bytes | None = field(default=None, init=False)  # a plain-text response body (metrics)
    # Language models (/v1), one stage each: DecodeChat, AuthorizeChat, WatchPrompts, Generate.
    chat: ChatExchange | None = field(default=None, init=False)
    # An admin route's change (what, to what), audited with the request: e.g. ("incident:7", "closed").
    operation: tuple[str, str] | None = field(default=None, init=False)
    # Authenticate: the dashboard session this request came with; OpenSession / CloseSession: the
    # session the transport sets as a cookie, or clears (the cookie value never enters a body).
    session_open: Session | None = field(default=None, init=False)
    session_issued: IssuedSession | None = field(default=None, init=False)
    session_ended: bool = field(default=False, init=False)


@dataclass(slots=True)
class ChatExchange:
    """What a `/v1/chat/completions` request gathers on its way: audited, never its text.

    `stream` is set instead of `completion` for `stream: true`: the deltas the leakage guard has
    released, then one `StreamEnd`; the service writes the stream's closing audit record after it.
    """

    request: ChatRequest  # DecodeChat
    model: ChatModel | None = None  # AuthorizeChat
    limits: ChatLimits | None = None  # AuthorizeChat: the principal's roles' most generous caps
    # ComposeChat: the client's messages as the model sees them after the protected prompt (demoted,
    # redacted); the protected prompt itself is added by Generate, with its canary.
    messages: tuple[ChatMessage, ...] = ()
    intent: IntentVerdict | None = None  # WatchPrompts
    max_tokens: int = 0  # Generate: the cap this request runs under
    prompt_tokens: int = 0  # Generate
    tokens_reserved: int = 0  # Generate: charged to the token budget, before the refund of unused ones
    usage: Usage | None = None  # Generate (streams: when the stream ends)
    finish_reason: str | None = None
    # Generate: "pass", or the detector that withheld the answer; "regenerated" when a retry passed.
    guard: str | None = None
    guard_score: float | None = None
    redactions: dict[str, int] = field(default_factory=dict)  # entity type -> count, input and output
    completion: Completion | None = None
    stream: AsyncGenerator[str | StreamEnd, None] | None = None
