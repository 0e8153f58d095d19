"""Dashboard sessions: a short-lived, process-bound credential for an admin's browser.

An admin exchanges an API key (never a token, never a session) for a session (`POST
/v2/admin/session`). The session is a Fernet token (AES-128-CBC + HMAC-SHA256, from `cryptography`)
under a key drawn at random when this object is built, so it opens only in this server process:
not on another server, not after a restart. It carries the key id, a session id and the session's
CSRF secret; it expires `ttl` seconds after it was issued (absolute, no sliding renewal).

The transport keeps it in an HttpOnly cookie and accepts it only on the dashboard and
`/v2/admin/*` routes; every state-changing request made with it must also present the CSRF secret
in a header (`require_csrf`), which a cross-site form cannot set. The key behind a session is read
on every request by the identity stage (`bastion.stages.identity`), as it is for a token.

Every way a session can fail raises `AuthenticationFailed` (401 toward the client, opaque), with the
reason for the audit log. Time is passed in (`now`, Unix seconds) so tests of expiry are exact.
"""

from __future__ import annotations

import base64
import hmac
import os
import secrets
from dataclasses import dataclass

import orjson
from cryptography.fernet import Fernet, InvalidToken

from bastion.errors import AuthenticationFailed

SESSION_TTL_SECONDS = 30 * 60
COOKIE_NAME = "bastion_session"
# Over TLS the `__Host-` prefix makes the browser insist on Secure, Path=/ and no Domain.
SECURE_COOKIE_NAME = "__Host-bastion_session"
CSRF_HEADER = "x-csrf-token"
_MAX_COOKIE = 1024  # characters; a real session is about 230
_MAX_ENDED = 10_000  # sessions ended early (logout, quarantine) remembered until they expire


@dataclass(frozen=True, slots=True)
class Session:
    """An open session: whose key, its id, its CSRF secret, when it ends (Unix seconds)."""

    key_id: str
    session_id: str
    csrf_token: str
    expires_at: float


@dataclass(frozen=True, slots=True)
class IssuedSession:
    session: Session
    cookie_value: str  # the sealed session, for the cookie only (never a response body)
    max_age: int  # seconds


class SessionAuthority:
    """Issues and opens sessions. One per server process, kept across policy reloads.

    `key`: 32 bytes for Fernet (tests pass one; by default `os.urandom`).
    """

    def __init__(self, *, ttl: int = SESSION_TTL_SECONDS, key: bytes | None = None) -> None:
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        self.ttl = ttl
        self._fernet = Fernet(base64.urlsafe_b64encode(key if key is not None else os.urandom(32)))
        self._ended: dict[str, float] = {}  # session id -> when it would have expired

    def issue(self, key_id: str, *, now: float) -> IssuedSession:
        """A new session for `key_id` (the caller has checked the key and its admin grant)."""
        session = Session(key_id, secrets.token_urlsafe(16), secrets.token_urlsafe(32), now + self.ttl)
        payload = orjson.dumps({"k": key_id, "s": session.session_id, "c": session.csrf_token})
        sealed = self._fernet.encrypt_at_time(payload, int(now)).decode("ascii")
        return IssuedSession(session, sealed, self.ttl)

    def open(self, cookie_value: str, *, now: float) -> Session:
        """The session sealed in `cookie_value`. Raises AuthenticationFailed when it was not sealed
        by this process, was altered, has expired or was ended."""
        if not cookie_value or len(cookie_value) > _MAX_COOKIE:
            raise AuthenticationFailed("session_malformed")
        try:
            # Fernet checks the MAC first, then the age (and refuses a timestamp in the future).
            payload = self._fernet.decrypt_at_time(cookie_value.encode("ascii"), self.ttl, int(now))
            issued = self._fernet.extract_timestamp(cookie_value.encode("ascii"))
        except (InvalidToken, UnicodeEncodeError):
            raise AuthenticationFailed("session_invalid_or_expired") from None
        doc = orjson.loads(payload)
        session = Session(str(doc["k"]), str(doc["s"]), str(doc["c"]), issued + self.ttl)
        if session.session_id in self._ended:
            raise AuthenticationFailed("session_ended")
        return session

    def end(self, session: Session, *, now: float) -> None:
        """End `session` before it expires (logout; its key quarantined). Remembered until it
        would have expired; if too many are remembered, every session ends (the key changes)."""
        self._ended = {sid: at for sid, at in self._ended.items() if at > now}
        if len(self._ended) >= _MAX_ENDED:
            # Fail closed: forgetting an ended session would revive it.
            self._fernet = Fernet(base64.urlsafe_b64encode(os.urandom(32)))
            self._ended.clear()
            return
        self._ended[session.session_id] = session.expires_at

    @staticmethod
    def require_csrf(session: Session, presented: str | None) -> None:
        """A state-changing request made with a session must carry its CSRF secret (compared in
        constant time). Raises AuthenticationFailed."""
        if not presented:
            raise AuthenticationFailed("session_csrf_missing")
        if not hmac.compare_digest(presented.encode("utf-8", "replace"), session.csrf_token.encode()):
            raise AuthenticationFailed("session_csrf_mismatch")
