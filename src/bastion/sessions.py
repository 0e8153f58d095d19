"""Dashboard sessions: a short-lived credential for an admin's browser, kept in a store every worker
and replica of one deployment reads, and no other deployment does.

An admin exchanges an API key (never a token, never a session) for a session (`POST
/v2/admin/session`). The cookie reads `<session id>.<secret>`: 128 random bits of id, 256 of
secret. The store (`bastion.records`: Redis or PostgreSQL with `state.backend` redis/postgres, else
a SQLite file in the state directory that the workers share) holds, under the id, the key id, the
SHA-256 of the secret and of the session's CSRF token, and when it expires: never the secret nor
the token. A stolen copy of the store opens no session. A cookie from another deployment (another
state directory, another Redis prefix or PostgreSQL table) names an id its store does not hold.

The CSRF token is an HMAC of the secret (so the page can be given it again on a later load, by any
worker, without it being stored); the transport keeps the cookie HttpOnly and accepts it only on the
dashboard and `/v2/admin/*` routes; every state-changing request made with it must also present
the CSRF token in a header (`require_csrf`), which a cross-site form cannot set. The key behind a
session is read on every request by the identity stage (`bastion.stages.identity`), as it is for a
token. A session expires `ttl` seconds after it was issued (absolute, no sliding renewal); logout,
and the key's revocation or quarantine, end it in the store (every worker and replica sees that
within 0.25 s: found sessions are cached until the store's change counter moves). A session outlives
a restart of its server: it belongs to the deployment, not to a process.

Every way a session can fail raises `AuthenticationFailed` (401 toward the client, opaque), with the
reason for the audit log. Time is passed in (`now`, Unix seconds) so tests of expiry are exact.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bastion.errors import AuthenticationFailed
from bastion.records import Records, Watch

SESSION_TTL_SECONDS = 30 * 60
COOKIE_NAME = "bastion_session"
# Over TLS the `__Host-` prefix makes the browser insist on Secure, Path=/ and no Domain.
SECURE_COOKIE_NAME = "__Host-bastion_session"
CSRF_HEADER = "x-csrf-token"
_COOKIE = re.compile(r"([A-Za-z0-9_-]{22})\.([A-Za-z0-9_-]{43})")  # token_urlsafe(16) . token_urlsafe(32)
_SESSIONS = "dashboard_sessions"  # the collection
_CLOCK_SLACK = 60  # seconds: a session "issued" later than this ahead of our clock is refused
_CACHE_MAX = 10_000


@dataclass(frozen=True, slots=True)
class Session:
    """An open session: whose key, its id, its CSRF token, when it ends (Unix seconds)."""

    key_id: str
    session_id: str
    csrf_token: str  # for the page (derived from the cookie's secret); never stored
    expires_at: float
    csrf_sha256: str = ""  # as stored: what a presented CSRF token is checked against


@dataclass(frozen=True, slots=True)
class IssuedSession:
    session: Session
    cookie_value: str  # the session id and secret, for the cookie only (never a response body)
    max_age: int  # seconds


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _csrf_of(secret: str) -> str:
    mac = hmac.new(secret.encode("ascii"), b"bastion dashboard csrf", hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode("ascii")


class SessionAuthority:
    """Issues, opens and ends sessions, over `records` (one deployment's store). One per server
    process, kept across policy reloads. Every method raises `StateUnavailable` when the store
    cannot be read: no session is then accepted (503)."""

    def __init__(
        self,
        records: Records,
        *,
        ttl: int = SESSION_TTL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        self.ttl = ttl
        self._records = records
        self._watch = Watch(records, _SESSIONS, clock=clock)
        self._lock = threading.Lock()
        self._cache: dict[str, dict[str, Any]] = {}  # session id -> stored record

    def issue(self, key_id: str, *, now: float) -> IssuedSession:
        """A new session for `key_id` (the caller has checked the key and its admin grant)."""
        self._purge(now)
        while True:
            session_id, secret = secrets.token_urlsafe(16), secrets.token_urlsafe(32)
            csrf = _csrf_of(secret)
            stored = {
                "key_id": key_id,
                "secret_sha256": _digest(secret),
                "csrf_sha256": _digest(csrf),
                "issued_at": now,
                "expires_at": now + self.ttl,
            }
            if self._records.swap(_SESSIONS, session_id, None, json.dumps(stored, sort_keys=True)):
                break  # else a 128-bit id collided: draw again
        with self._lock:
            self._watch.invalidate()
        session = Session(key_id, session_id, csrf, now + self.ttl, _digest(csrf))
        return IssuedSession(session, f"{session_id}.{secret}", self.ttl)

    def open(self, cookie_value: str, *, now: float) -> Session:
        """The session `cookie_value` names. Raises AuthenticationFailed when it is malformed, not
        in this deployment's store, altered, expired or ended."""
        found = _COOKIE.fullmatch(cookie_value or "")
        if found is None:
            raise AuthenticationFailed("session_malformed")
        session_id, secret = found.groups()
        stored = self._stored(session_id)
        if stored is None or not hmac.compare_digest(_digest(secret), str(stored.get("secret_sha256", ""))):
            raise AuthenticationFailed("session_invalid_or_expired")
        expires_at = float(stored["expires_at"])
        if not float(stored["issued_at"]) - _CLOCK_SLACK <= now < expires_at:
            raise AuthenticationFailed("session_invalid_or_expired")
        if stored.get("ended"):
            raise AuthenticationFailed("session_ended")
        return Session(
            str(stored["key_id"]), session_id, _csrf_of(secret), expires_at, str(stored["csrf_sha256"])
        )

    def _stored(self, session_id: str) -> dict[str, Any] | None:
        with self._lock:
            if self._watch.stale() or len(self._cache) > _CACHE_MAX:
                self._cache.clear()
            cached = self._cache.get(session_id)
            if cached is not None:
                return cached
            text = self._records.get(_SESSIONS, session_id)
            if text is None:  # unknown ids are not cached: a client could fill the cache with them
                return None
            stored: dict[str, Any] = json.loads(text)
            self._cache[session_id] = stored
            return stored

    def end(self, session: Session, *, now: float) -> None:
        """End `session` before it expires (logout; its key revoked or quarantined), for every worker
        and replica. Kept, marked ended, until it would have expired (the audit log's reason)."""

        def change(text: str) -> str:
            return json.dumps({**json.loads(text), "ended": True}, sort_keys=True)

        for _ in range(64):
            text = self._records.get(_SESSIONS, session.session_id)
            if text is None or json.loads(text).get("ended"):
                break
            if self._records.swap(_SESSIONS, session.session_id, text, change(text)):
                break
        with self._lock:
            self._watch.invalidate()

    def _purge(self, now: float) -> None:
        """Drop the sessions that have expired (ended ones included)."""
        for session_id, text in self._records.items(_SESSIONS).items():
            if float(json.loads(text)["expires_at"]) <= now:
                self._records.swap(_SESSIONS, session_id, text, None)  # lost to another writer: fine

    @staticmethod
    def require_csrf(session: Session, presented: str | None) -> None:
        """A state-changing request made with a session must carry its CSRF token: its SHA-256 is
        compared, in constant time, with the one the store holds. Raises AuthenticationFailed."""
        if not presented:
            raise AuthenticationFailed("session_csrf_missing")
        digest = hashlib.sha256(presented.encode("utf-8", "replace")).hexdigest()
        if not session.csrf_sha256 or not hmac.compare_digest(digest, session.csrf_sha256):
            raise AuthenticationFailed("session_csrf_mismatch")
