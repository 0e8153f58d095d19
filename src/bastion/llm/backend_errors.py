"""The one error a language-model backend raises when it cannot answer.

`BackendUnavailable(message, status=..., reason=...)` is a `bastion.errors.BackendError` whose stable
code follows from the status: 502 `backend_failed` (the upstream answered badly), 503
`backend_unavailable` (the model cannot answer now), 504 `backend_timeout` (no answer in time). Its
message is generic and fixed at the raise site: it never holds the upstream's body (it could quote
the prompt), a credential or a prompt. `reason` is for operators (logs, metrics): a short fixed
token such as "upstream_status_401", never text from the upstream.
"""

from __future__ import annotations

from typing import Literal

from bastion.errors import BackendError, ErrorCode

BackendStatus = Literal[502, 503, 504]

_CODES: dict[int, ErrorCode] = {
    502: ErrorCode.BACKEND_FAILED,
    503: ErrorCode.BACKEND_UNAVAILABLE,
    504: ErrorCode.BACKEND_TIMEOUT,
}


class BackendUnavailable(BackendError):
    """502 (the upstream answered badly), 503 (the model cannot answer now), 504 (no answer in time)."""

    def __init__(self, message: str, *, status: BackendStatus = 503, reason: str) -> None:
        super().__init__(message, code=_CODES[status])
        self.reason = reason

    def __repr__(self) -> str:
        return f"BackendUnavailable({self.message!r}, status={self.status}, reason={self.reason!r})"
