"""One small exception hierarchy.

Every error a client can cause is a `BastionError` carrying an HTTP status and a
stable `code` slug; the HTTP layer maps them to `{"error": ..., "code": ...}` in
one place. Messages are written for the caller and must never contain secrets or
the value of an input flagged sensitive.
"""

from __future__ import annotations


class BastionError(Exception):
    """Base of every error Bastion raises on purpose."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class BadRequest(BastionError):
    status = 400
    code = "bad_request"


class AuthenticationFailed(BastionError):
    """401. Toward the client every failure reads the same; the reason goes to the audit log."""

    status = 401
    code = "unauthenticated"

    def __init__(self, reason: str) -> None:
        super().__init__("missing or invalid credentials")
        # Operator-facing reason code (audit log only), e.g. "key_revoked".
        self.reason = reason


class PermissionDenied(BastionError):
    status = 403
    code = "forbidden"


class NotFound(BastionError):
    status = 404
    code = "not_found"


class MethodNotAllowed(BastionError):
    status = 405
    code = "method_not_allowed"


class PayloadTooLarge(BastionError):
    status = 413
    code = "payload_too_large"


class SchemaViolation(BastionError):
    """422: well-formed JSON that does not fit the model's declared inputs."""

    status = 422
    code = "schema_violation"


class RateLimited(BastionError):
    status = 429
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after: float, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after


class AuthThrottled(RateLimited):
    """429 before identity: this client address failed authentication too often; nothing was checked."""

    code = "auth_throttled"

    def __init__(self, *, retry_after: float) -> None:
        super().__init__("too many failed authentications from this address", retry_after=retry_after)


class NotReady(BastionError):
    status = 503
    code = "not_ready"


class StateUnavailable(BastionError):
    """503: the shared state (privacy budgets) cannot be read or written; nothing was answered."""

    status = 503
    code = "state_unavailable"


class Overloaded(BastionError):
    """503: more requests in flight than `[server] max_concurrent_requests`; retry after `retry_after` s."""

    status = 503
    code = "overloaded"

    def __init__(self, message: str, *, retry_after: float, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after


# Refused by the HTTP front end before the application runs; the connection is closed after the answer.


class HeadersTooLarge(BastionError):
    """431: the request head is over `[server] max_header_bytes` or has over `max_header_fields` fields."""

    status = 431
    code = "headers_too_large"


class RequestTimeout(BastionError):
    """408: the request head or body did not arrive within its deadline."""

    status = 408
    code = "request_timeout"


# Errors that stop the operator, not a client: bad config, bad model files, bad keys.


class ConfigError(Exception):
    """The policy file is invalid. The message names the file, the field and the reason."""


class ModelLoadError(Exception):
    """A model directory cannot be served. The message names the file and what is wrong."""


class StateDirLocked(Exception):
    """Another server holds the state directory's lock. The message names the directory and its PID."""

    def __init__(self, message: str, *, pid: int | None) -> None:
        super().__init__(message)
        self.pid = pid


class AuditIntegrityError(Exception):
    """The audit chain does not verify. `seq` names the first bad record."""

    def __init__(self, message: str, *, seq: int | None) -> None:
        super().__init__(message)
        self.seq = seq
