"""One exception root, one registry of stable error codes.

`BastionException` is the root of every exception Bastion raises on purpose. Beneath it:

- `BastionError`: the refusal of one request. It carries a stable `code` (an `ErrorCode`) and the
  HTTP `status` read from `HTTP_STATUS`; every transport maps it to `{"error": ..., "code": ...}`
  in one place (gRPC: `GRPC_STATUS`). `except BastionError` means "this request is refused".
- Operator errors that stop a start-up or a command, never a request's answer: `ConfigError`,
  `ModelLoadError`, `StateDirLocked`, `AuditIntegrityError` here, and `DecryptionFailed`,
  `SignatureError`, `AuditUnavailable`, `RemoteError` beside the code that raises them.

Messages are written for the caller and must never contain secrets or the value of an input
flagged sensitive.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Every `code` the server can answer with. Clients may branch on these; they do not change."""

    # 400: the body or the request line is not a request
    BAD_REQUEST = "bad_request"
    MALFORMED_HTTP = "malformed_http"  # the HTTP parser's own refusal (request line, header, chunk)
    MALFORMED_JSON = "malformed_json"
    MALFORMED_REQUEST = "malformed_request"
    UNSUPPORTED_PARAMETER = "unsupported_parameter"
    BAD_CONTENT_LENGTH = "bad_content_length"
    CLIENT_DISCONNECTED = "client_disconnected"
    # the binary tensor extension: Inference-Header-Content-Length or binary_data_size framing
    BAD_HEADER_LENGTH = "bad_header_length"
    MALFORMED_BINARY = "malformed_binary"
    UNSUPPORTED_CONTENT_ENCODING = "unsupported_content_encoding"  # a compressed request body
    INVALID_TRANSITION = "invalid_transition"  # an incident cannot move to that state from its own
    # /v1 (language models): a request over the model's context or the role's max_tokens
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"  # OpenAI's own code for it
    MAX_TOKENS_TOO_LARGE = "max_tokens_too_large"
    # 401: every identity failure reads the same toward the client (the reason is audited)
    UNAUTHENTICATED = "unauthenticated"
    # 403
    FORBIDDEN = "forbidden"
    AGGREGATES_DISABLED = "aggregates_disabled"
    KEY_QUARANTINED = "key_quarantined"
    TTL_NOT_GRANTED = "ttl_not_granted"
    SCOPE_NOT_GRANTED = "scope_not_granted"
    OUTPUT_NOT_GRANTED = "output_not_granted"
    SENSITIVE_INPUT_DENIED = "sensitive_input_denied"
    POLICY_NOT_APPLICABLE = "policy_not_applicable"
    PRIVATE_PREDICTION_UNAVAILABLE = "private_prediction_unavailable"
    DP_UNAVAILABLE = "dp_unavailable"
    SYSTEM_MESSAGE_REFUSED = "system_message_refused"  # a client system message, where policy refuses them
    OUTPUT_WITHHELD = "output_withheld"  # the leakage guard found the protected prompt in the answer
    # 404
    NOT_FOUND = "not_found"
    ROUTE_NOT_FOUND = "route_not_found"
    MODEL_NOT_FOUND = "model_not_found"
    INCIDENT_NOT_FOUND = "incident_not_found"
    METRICS_DISABLED = "metrics_disabled"
    # 405
    METHOD_NOT_ALLOWED = "method_not_allowed"
    # 408
    REQUEST_TIMEOUT = "request_timeout"
    # 413
    PAYLOAD_TOO_LARGE = "payload_too_large"
    TOO_MANY_ROWS = "too_many_rows"
    TOO_MANY_MESSAGES = "too_many_messages"
    PROMPT_TOO_LONG = "prompt_too_long"  # more prompt tokens than the caller's role allows
    # 422: well-formed, but not what the model takes
    SCHEMA_VIOLATION = "schema_violation"
    EMPTY_TENSOR = "empty_tensor"
    UNSUPPORTED_DATATYPE = "unsupported_datatype"
    WRONG_DATATYPE = "wrong_datatype"
    SHAPE_MISMATCH = "shape_mismatch"
    WRONG_SHAPE = "wrong_shape"
    NO_REFERENCE_DATA = "no_reference_data"
    UNKNOWN_INPUT = "unknown_input"
    MISSING_INPUT = "missing_input"
    OUT_OF_DISTRIBUTION = "out_of_distribution"
    NOT_FINITE = "not_finite"
    OUT_OF_RANGE = "out_of_range"
    NOT_A_CATEGORY = "not_a_category"
    UNKNOWN_OUTPUT = "unknown_output"
    # 429
    RATE_LIMITED = "rate_limited"
    THROTTLED = "throttled"  # the containment ladder's throttle step on this principal and model
    # A principal's requests running or queued on a language model; on gRPC, an address's calls still
    # waiting for their request message (bastion.grpc.server).
    TOO_MANY_IN_FLIGHT = "too_many_in_flight"
    QUOTA_EXHAUSTED = "quota_exhausted"
    AUTH_THROTTLED = "auth_throttled"
    PRIVACY_BUDGET_EXHAUSTED = "privacy_budget_exhausted"
    TOKEN_BUDGET_EXHAUSTED = "token_budget_exhausted"  # noqa: S105 (a code, not a secret)
    # 431
    HEADERS_TOO_LARGE = "headers_too_large"
    # 500: the server's failure
    INTERNAL_ERROR = "internal_error"
    INFERENCE_FAILED = "inference_failed"
    # 502 / 504: a language model's backend (an upstream server) failed or did not answer in time
    BACKEND_FAILED = "backend_failed"
    BACKEND_TIMEOUT = "backend_timeout"
    # 504: a model's runtime call passed its inference_timeout_seconds (bastion.breaker)
    INFERENCE_TIMEOUT = "inference_timeout"
    # 503: try later (or elsewhere)
    NOT_READY = "not_ready"
    ROUTE_DISABLED = "route_disabled"
    MODEL_ISOLATED = "model_isolated"
    STATE_UNAVAILABLE = "state_unavailable"
    OVERLOADED = "overloaded"
    AUDIT_UNAVAILABLE = "audit_unavailable"
    MODEL_BUSY = "model_busy"  # a language model's wait queue is full
    BACKEND_UNAVAILABLE = "backend_unavailable"
    MODEL_CIRCUIT_OPEN = "model_circuit_open"  # the model's circuit breaker is open (bastion.breaker)
    MODEL_OVERLOADED = "model_overloaded"  # a model's calls waiting for a thread are at their bound


# The HTTP status of every code, in one table (a unit test checks it covers the enum).
HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.MALFORMED_HTTP: 400,
    ErrorCode.MALFORMED_JSON: 400,
    ErrorCode.MALFORMED_REQUEST: 400,
    ErrorCode.UNSUPPORTED_PARAMETER: 400,
    ErrorCode.BAD_CONTENT_LENGTH: 400,
    ErrorCode.CLIENT_DISCONNECTED: 400,
    ErrorCode.BAD_HEADER_LENGTH: 400,
    ErrorCode.MALFORMED_BINARY: 400,
    ErrorCode.UNSUPPORTED_CONTENT_ENCODING: 400,
    ErrorCode.INVALID_TRANSITION: 400,
    ErrorCode.CONTEXT_LENGTH_EXCEEDED: 400,
    ErrorCode.MAX_TOKENS_TOO_LARGE: 400,
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.AGGREGATES_DISABLED: 403,
    ErrorCode.KEY_QUARANTINED: 403,
    ErrorCode.TTL_NOT_GRANTED: 403,
    ErrorCode.SCOPE_NOT_GRANTED: 403,
    ErrorCode.OUTPUT_NOT_GRANTED: 403,
    ErrorCode.SENSITIVE_INPUT_DENIED: 403,
    ErrorCode.POLICY_NOT_APPLICABLE: 403,
    ErrorCode.PRIVATE_PREDICTION_UNAVAILABLE: 403,
    ErrorCode.DP_UNAVAILABLE: 403,
    ErrorCode.SYSTEM_MESSAGE_REFUSED: 403,
    ErrorCode.OUTPUT_WITHHELD: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.ROUTE_NOT_FOUND: 404,
    ErrorCode.MODEL_NOT_FOUND: 404,
    ErrorCode.INCIDENT_NOT_FOUND: 404,
    ErrorCode.METRICS_DISABLED: 404,
    ErrorCode.METHOD_NOT_ALLOWED: 405,
    ErrorCode.REQUEST_TIMEOUT: 408,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.TOO_MANY_ROWS: 413,
    ErrorCode.TOO_MANY_MESSAGES: 413,
    ErrorCode.PROMPT_TOO_LONG: 413,
    ErrorCode.SCHEMA_VIOLATION: 422,
    ErrorCode.EMPTY_TENSOR: 422,
    ErrorCode.UNSUPPORTED_DATATYPE: 422,
    ErrorCode.WRONG_DATATYPE: 422,
    ErrorCode.SHAPE_MISMATCH: 422,
    ErrorCode.WRONG_SHAPE: 422,
    ErrorCode.NO_REFERENCE_DATA: 422,
    ErrorCode.UNKNOWN_INPUT: 422,
    ErrorCode.MISSING_INPUT: 422,
    ErrorCode.OUT_OF_DISTRIBUTION: 422,
    ErrorCode.NOT_FINITE: 422,
    ErrorCode.OUT_OF_RANGE: 422,
    ErrorCode.NOT_A_CATEGORY: 422,
    ErrorCode.UNKNOWN_OUTPUT: 422,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.THROTTLED: 429,
    ErrorCode.TOO_MANY_IN_FLIGHT: 429,
    ErrorCode.QUOTA_EXHAUSTED: 429,
    ErrorCode.AUTH_THROTTLED: 429,
    ErrorCode.PRIVACY_BUDGET_EXHAUSTED: 429,
    ErrorCode.TOKEN_BUDGET_EXHAUSTED: 429,
    ErrorCode.HEADERS_TOO_LARGE: 431,
    ErrorCode.INTERNAL_ERROR: 500,
    ErrorCode.INFERENCE_FAILED: 500,
    ErrorCode.BACKEND_FAILED: 502,
    ErrorCode.BACKEND_TIMEOUT: 504,
    ErrorCode.INFERENCE_TIMEOUT: 504,
    ErrorCode.NOT_READY: 503,
    ErrorCode.ROUTE_DISABLED: 503,
    ErrorCode.MODEL_ISOLATED: 503,
    ErrorCode.STATE_UNAVAILABLE: 503,
    ErrorCode.OVERLOADED: 503,
    ErrorCode.AUDIT_UNAVAILABLE: 503,
    ErrorCode.MODEL_BUSY: 503,
    ErrorCode.BACKEND_UNAVAILABLE: 503,
    ErrorCode.MODEL_CIRCUIT_OPEN: 503,
    ErrorCode.MODEL_OVERLOADED: 503,
}

# The gRPC status (a `grpc.StatusCode` name, so no grpc import here) of each HTTP status above; the
# gRPC front end sends the same stable `code` in the status details.
GRPC_STATUS: dict[int, str] = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "UNIMPLEMENTED",
    408: "DEADLINE_EXCEEDED",
    413: "RESOURCE_EXHAUSTED",  # as grpc's own message-size refusal
    422: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    431: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def grpc_status(code: ErrorCode) -> str:
    """The `grpc.StatusCode` name for an error code, e.g. "PERMISSION_DENIED"."""
    return GRPC_STATUS[HTTP_STATUS[code]]


class BastionException(Exception):
    """Root of every exception Bastion raises on purpose."""


class BastionError(BastionException):
    """The refusal of one request: a stable `code` and its HTTP `status` (from `HTTP_STATUS`).

    A subclass names the kind (its default `code`); a raise site may give a narrower code of the
    same status, e.g. `SchemaViolation(msg, code=ErrorCode.WRONG_SHAPE)`.
    """

    code: ErrorCode = ErrorCode.INTERNAL_ERROR

    def __init__(self, message: str, *, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    @property
    def status(self) -> int:
        return HTTP_STATUS[self.code]


class BadRequest(BastionError):
    code = ErrorCode.BAD_REQUEST


class AuthenticationFailed(BastionError):
    """401. Toward the client every failure reads the same; the reason goes to the audit log."""

    code = ErrorCode.UNAUTHENTICATED

    def __init__(self, reason: str) -> None:
        super().__init__("missing or invalid credentials")
        # Operator-facing reason (audit log and metrics only), e.g. "key_revoked".
        self.reason = reason


class PermissionDenied(BastionError):
    code = ErrorCode.FORBIDDEN


class NotFound(BastionError):
    code = ErrorCode.NOT_FOUND


class MethodNotAllowed(BastionError):
    """405; `allowed` is the Allow header's value (the methods the route answers)."""

    code = ErrorCode.METHOD_NOT_ALLOWED

    def __init__(self, message: str, *, allowed: str) -> None:
        super().__init__(message)
        self.allowed = allowed


class PayloadTooLarge(BastionError):
    code = ErrorCode.PAYLOAD_TOO_LARGE


class SchemaViolation(BastionError):
    """422: a well-formed request that does not fit the model's declared inputs."""

    code = ErrorCode.SCHEMA_VIOLATION


class RateLimited(BastionError):
    code = ErrorCode.RATE_LIMITED

    def __init__(self, message: str, *, retry_after: float, code: ErrorCode | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after


class AuthThrottled(RateLimited):
    """429 before identity: this client address failed authentication too often; nothing was checked."""

    code = ErrorCode.AUTH_THROTTLED

    def __init__(self, *, retry_after: float) -> None:
        super().__init__("too many failed authentications from this address", retry_after=retry_after)


class NotReady(BastionError):
    code = ErrorCode.NOT_READY


class StateUnavailable(BastionError):
    """503: the shared state (privacy budgets) cannot be read or written; nothing was answered.

    `source`: the setting and host:port that failed (`"state.postgres_dsn, 10.0.0.5:5432"`), for the
    operator (logs, the CLI), never sent to a client."""

    code = ErrorCode.STATE_UNAVAILABLE

    def __init__(self, message: str, *, source: str = "") -> None:
        super().__init__(message)
        self.source = source


class Overloaded(BastionError):
    """503: more requests in flight than `[server] max_concurrent_requests`; retry after `retry_after` s."""

    code = ErrorCode.OVERLOADED

    def __init__(self, message: str, *, retry_after: float, code: ErrorCode | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after


class ModelFailed(BastionError):
    """500: the model itself raised; the server's failure, not the client's input."""

    code = ErrorCode.INFERENCE_FAILED


class InferenceTimeout(BastionError):
    """504: the model's runtime did not answer within its `inference_timeout_seconds` (a server-side
    failure: it counts toward the model's circuit breaker and a canary's error rate)."""

    code = ErrorCode.INFERENCE_TIMEOUT

    def __init__(self, seconds: float) -> None:
        super().__init__(f"the model did not answer within {seconds:g} s")


class ModelCircuitOpen(BastionError):
    """503: the model's circuit breaker is open after repeated server-side failures; the runtime was
    not called. `retry_after`: seconds until a probe may be let through (the Retry-After header)."""

    code = ErrorCode.MODEL_CIRCUIT_OPEN

    def __init__(self, retry_after: float) -> None:
        super().__init__("the model is failing and is not taking requests for now; retry later")
        self.retry_after = retry_after


class ModelOverloaded(BastionError):
    """503: the model's threads are busy and its wait queue is at its bound (`inference_queue`, or
    this principal's share of it, `inference_queue_per_principal`), or the call waited
    `inference_queue_seconds` without a thread. Load, not a fault of the model: it never counts
    toward the circuit breaker or a canary's error rate. `retry_after`: seconds (Retry-After)."""

    code = ErrorCode.MODEL_OVERLOADED

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BackendError(BastionError):
    """A language model's backend could not answer: 503 `backend_unavailable` (down, or `model_busy`:
    its queue full), 502 `backend_failed` (it answered with an error), 504 `backend_timeout`. The
    message is Bastion's own, never the upstream's body (it could quote the prompt)."""

    code = ErrorCode.BACKEND_UNAVAILABLE


class OutputWithheld(BastionError):
    """403: the leakage guard found the protected prompt (or its canary or a secret) in the answer."""

    code = ErrorCode.OUTPUT_WITHHELD

    def __init__(self, *, detector: str, score: float) -> None:
        super().__init__("the answer was withheld: it would have revealed confidential instructions")
        self.detector = detector  # audited; the client sees only the message
        self.score = score


# Refused by the HTTP front end before the application runs; the connection is closed after the answer.


class HeadersTooLarge(BastionError):
    """431: the request head is over `[server] max_header_bytes` or has over `max_header_fields` fields."""

    code = ErrorCode.HEADERS_TOO_LARGE


class RequestTimeout(BastionError):
    """408: the request head or body did not arrive within its deadline."""

    code = ErrorCode.REQUEST_TIMEOUT


# Errors that stop the operator, not a client: bad config, bad model files, bad keys.


class ConfigError(BastionException):
    """The policy file is invalid. The message names the file, the field and the reason."""


class ModelLoadError(BastionException):
    """A model directory cannot be served. The message names the file and what is wrong."""


class StateDirLocked(BastionException):
    """Another server holds the state directory's lock. The message names the directory and its PID."""

    def __init__(self, message: str, *, pid: int | None) -> None:
        super().__init__(message)
        self.pid = pid


class AuditIntegrityError(BastionException):
    """The audit chain does not verify. `seq` names the first bad record."""

    def __init__(self, message: str, *, seq: int | None) -> None:
        super().__init__(message)
        self.seq = seq
