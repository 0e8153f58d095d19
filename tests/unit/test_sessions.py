"""Dashboard sessions from the attacker's side: forged, tampered, replayed on another server or after
a restart, expired, ended, without or with a wrong CSRF token, cross-site; the key behind a session
revoked or quarantined. Real parts: Fernet, the SQLite key store, the identity stage."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bastion.config import Action
from bastion.context import RequestContext, SessionCredentials
from bastion.errors import AuthenticationFailed
from bastion.keys import KeyStore
from bastion.sessions import SESSION_TTL_SECONDS, SessionAuthority
from bastion.stages.identity import Authenticate
from bastion.tokens import TokenAuthority, load_or_create_signing_key

NOW = 1_700_000_000.0


def _reason(call: object) -> str:
    with pytest.raises(AuthenticationFailed) as caught:
        call()  # type: ignore[operator]
    return caught.value.reason


def test_a_session_opens_only_where_and_while_it_was_issued() -> None:
    sessions = SessionAuthority()
    issued = sessions.issue("0123456789abcdef", now=NOW)
    opened = sessions.open(issued.cookie_value, now=NOW + 60)
    assert (opened.key_id, opened.csrf_token) == ("0123456789abcdef", issued.session.csrf_token)
    assert opened.expires_at == NOW + SESSION_TTL_SECONDS
    # The cookie carries no readable key id or CSRF token.
    assert "0123456789abcdef" not in issued.cookie_value
    assert issued.session.csrf_token not in issued.cookie_value

    # Another server, or this one after a restart: another key.
    assert (
        _reason(lambda: SessionAuthority().open(issued.cookie_value, now=NOW)) == "session_invalid_or_expired"
    )
    # Expired: 30 minutes after login, whatever happened in between.
    assert _reason(lambda: sessions.open(issued.cookie_value, now=NOW + SESSION_TTL_SECONDS + 1)) == (
        "session_invalid_or_expired"
    )
    # Issued "in the future" (a clock moved back): refused too.
    assert _reason(lambda: sessions.open(issued.cookie_value, now=NOW - 3600)) == "session_invalid_or_expired"


@pytest.mark.parametrize("position", [0, 10, 60, 100, -2])
def test_a_tampered_cookie_is_refused(position: int) -> None:
    sessions = SessionAuthority()
    cookie = sessions.issue("0123456789abcdef", now=NOW).cookie_value
    flipped = "A" if cookie[position] != "A" else "B"
    tampered = cookie[:position] + flipped + cookie[position + 1 :] if position >= 0 else cookie[:-2] + "AA"
    assert tampered != cookie
    assert _reason(lambda: sessions.open(tampered, now=NOW)) in (
        "session_invalid_or_expired",
        "session_malformed",
    )


@pytest.mark.parametrize("cookie", ["", "x", "é" * 10, "gAAAAA" + "A" * 2000, "null"])
def test_garbage_is_refused(cookie: str) -> None:
    assert _reason(lambda: SessionAuthority().open(cookie, now=NOW)).startswith("session_")


def test_an_ended_session_stays_ended_and_the_csrf_token_is_checked() -> None:
    sessions = SessionAuthority()
    issued = sessions.issue("0123456789abcdef", now=NOW)
    session = sessions.open(issued.cookie_value, now=NOW)
    sessions.require_csrf(session, issued.session.csrf_token)
    assert _reason(lambda: sessions.require_csrf(session, None)) == "session_csrf_missing"
    assert _reason(lambda: sessions.require_csrf(session, "")) == "session_csrf_missing"
    assert _reason(lambda: sessions.require_csrf(session, issued.session.csrf_token[:-1] + "x")) == (
        "session_csrf_mismatch"
    )
    # Another session's token does not do for this one.
    other = sessions.issue("0123456789abcdef", now=NOW).session.csrf_token
    assert _reason(lambda: sessions.require_csrf(session, other)) == "session_csrf_mismatch"
    sessions.end(session, now=NOW)
    assert _reason(lambda: sessions.open(issued.cookie_value, now=NOW + 1)) == "session_ended"


def test_too_many_ended_sessions_end_every_session(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("bastion.sessions._MAX_ENDED", 3)
    sessions = SessionAuthority()
    kept = sessions.issue("0123456789abcdef", now=NOW)
    for _ in range(4):  # three remembered, the fourth finds the list full
        sessions.end(
            sessions.open(sessions.issue("0123456789abcdef", now=NOW).cookie_value, now=NOW), now=NOW
        )
    # Forgetting an ended session would revive it: the key changed instead, so nothing opens.
    assert _reason(lambda: sessions.open(kept.cookie_value, now=NOW)) == "session_invalid_or_expired"


# -- the identity stage --------------------------------------------------------------------------


class _Parts:
    def __init__(self, tmp_path: Path) -> None:
        self.keys = KeyStore(tmp_path / "keys.db")
        tokens = TokenAuthority(
            load_or_create_signing_key(tmp_path / "token.key"), issuer="b", audience="b", default_ttl=60
        )
        self.sessions = SessionAuthority()
        self.tokens = tokens
        self.stage = Authenticate(self.keys, tokens, sessions=self.sessions)
        self.plain = Authenticate(self.keys, tokens)
        self.admin = self.keys.create(name="ops", roles=["admin"], now=NOW)
        self.issued = self.sessions.issue(self.admin.record.key_id, now=NOW)

    def ctx(
        self,
        *,
        cookie: str | None = None,
        csrf: str | None = None,
        post: bool = False,
        cross_site: bool = False,
        credentials: str | None = None,
        now: float = NOW + 5,
    ) -> RequestContext:
        async def no_body(limit: int) -> bytes:
            return b""

        session = None
        if cookie is not None:
            session = SessionCredentials(cookie, csrf, state_changing=post, cross_site=cross_site)
        return RequestContext(
            request_id="r",
            action=Action.ADMIN,
            now=now,
            credentials=credentials,
            read_body=no_body,
            session=session,
        )

    def run(self, ctx: RequestContext, stage: Authenticate | None = None) -> RequestContext:
        asyncio.run((stage or self.stage)(ctx))
        return ctx


@pytest.fixture
def parts(tmp_path: Path) -> _Parts:
    p = _Parts(tmp_path)
    yield p
    p.keys.close()


def test_a_session_names_its_key_and_a_post_needs_its_csrf_token(parts: _Parts) -> None:
    cookie, csrf = parts.issued.cookie_value, parts.issued.session.csrf_token
    ctx = parts.run(parts.ctx(cookie=cookie))
    assert ctx.principal is not None and ctx.principal.key_id == parts.admin.record.key_id
    assert ctx.principal.via == "session" and ctx.session_open is not None
    assert parts.run(parts.ctx(cookie=cookie, csrf=csrf, post=True)).principal is not None
    assert _reason(lambda: parts.run(parts.ctx(cookie=cookie, post=True))) == "session_csrf_missing"
    assert _reason(lambda: parts.run(parts.ctx(cookie=cookie, csrf="guess", post=True))) == (
        "session_csrf_mismatch"
    )
    # A browser that says the request is cross-site is refused even with the token.
    assert _reason(lambda: parts.run(parts.ctx(cookie=cookie, csrf=csrf, post=True, cross_site=True))) == (
        "session_cross_site"
    )


def test_routes_built_without_sessions_ignore_the_cookie(parts: _Parts) -> None:
    ctx = parts.ctx(cookie=parts.issued.cookie_value)
    assert _reason(lambda: parts.run(ctx, parts.plain)) == "missing_credentials"


def test_an_authorization_header_wins_over_the_cookie(parts: _Parts) -> None:
    analyst = parts.keys.create(name="a", roles=["analyst"], now=NOW)
    ctx = parts.run(
        parts.ctx(cookie=parts.issued.cookie_value, credentials=f"Bearer {analyst.secret}", post=True)
    )
    assert ctx.principal is not None and ctx.principal.key_id == analyst.record.key_id
    assert ctx.principal.via == "key" and ctx.session_open is None


def test_revoking_the_key_ends_its_sessions_at_once(parts: _Parts) -> None:
    parts.keys.revoke(parts.admin.record.key_id, now=NOW + 1)
    assert _reason(lambda: parts.run(parts.ctx(cookie=parts.issued.cookie_value))) == "key_revoked"


def test_quarantining_the_key_ends_the_session_and_a_release_does_not_revive_it(parts: _Parts) -> None:
    key_id = parts.admin.record.key_id
    parts.keys.quarantine(key_id, now=NOW + 1)
    assert (
        _reason(lambda: parts.run(parts.ctx(cookie=parts.issued.cookie_value))) == "session_key_quarantined"
    )
    parts.keys.release(key_id)
    assert _reason(lambda: parts.run(parts.ctx(cookie=parts.issued.cookie_value))) == "session_ended"
    # The key itself works again, and may open a new session.
    fresh = parts.sessions.issue(key_id, now=NOW + 2)
    assert parts.run(parts.ctx(cookie=fresh.cookie_value)).principal is not None


def test_a_session_for_an_unknown_key_is_refused(parts: _Parts) -> None:
    forged_owner = parts.sessions.issue("ffffffffffffffff", now=NOW)
    assert _reason(lambda: parts.run(parts.ctx(cookie=forged_owner.cookie_value))) == "session_key_unknown"
