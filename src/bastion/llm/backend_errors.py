"""The one error a language-model backend raises when it cannot answer.

Stopgap until `bastion.errors` has its own codes (the lines to add are in the backends' report):
`BackendUnavailable` is a `BastionError` whose `status` is 502, 503 or 504 and whose `code` is, for
now, the nearest existing one (`not_ready`). Its message is generic and fixed at the raise site: it
never holds the upstream's body (it could quote the prompt), a credential or a prompt. `reason` is
for operators (logs, metrics): a short fixed token such as "upstream_status_401", never text from
the upstream.
"""

from __future__ import annotations

from typing import Literal

from bastion.errors import BastionError, ErrorCode

BackendStatus = Literal[502, 503, 504]


class BackendUnavailable(BastionError):
    """502 (the upstream answered badly), 503 (the model cannot answer now), 504 (no answer in time)."""

    code = ErrorCode.NOT_READY  # until errors.py has BACKEND_ERROR / BACKEND_UNAVAILABLE / BACKEND_TIMEOUT

    def __init__(self, message: str, *, status: BackendStatus = 503, reason: str) -> None:
        super().__init__(message)
        self._status = status
        self.reason = reason

    @property
    def status(self) -> int:
        return self._status

    def __repr__(self) -> str:
        return f"BackendUnavailable({self.message!r}, status={self._status}, reason={self.reason!r})"
