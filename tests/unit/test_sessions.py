"""Dashboard sessions from the attacker's side: forged, tampered, replayed on another deployment,
expired, ended, without or with a wrong CSRF token, cross-site; the key behind a session revoked or
quarantined; a copy of the store opens nothing (only hashes). Sessions live in the deployment's
store (bastion.records): two authorities on one store stand for two workers or replicas, on SQLite,
a real Redis and a real PostgreSQL. Real parts: the stores, the SQLite key store, the identity stage."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bastion.config import Action
from bastion.context import RequestContext, SessionCredentials
from bastion.errors import AuthenticationFailed
from bastion.keys import KeyStore
from bastion.records import CHECK_EVERY, Records
from bastion.records.postgres import PostgresRecords
from bastion.records.redis import RedisRecords
from bastion.records.sqlite import SQLiteRecords
from bastion.sessions import SESSION_TTL_SECONDS, SessionAuthority
from bastion.stages.identity import Authenticate
from bastion.tokens import TokenAuthority, load_or_create_signing_key
from tests.helpers import (
    POSTGRES_DSN,
    REDIS_URL,
    drop_postgres_table,
    drop_redis_keys,
    postgres_table,
    redis_prefix,
)

NOW = 1_700_000_000.0


def _reason(call: object) -> str:
    with pytest.raises(AuthenticationFailed) as caught:
        call()  # type: ignore[operator]
    return caught.value.reason


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Callable[[str], Records]]:
    """store(name): the SQLite records of deployment `name` (its state directory's records.db)."""
    opened: list[Records] = []

    def open_store(name: str = "a") -> Records:
        opened.append(SQLiteRecords(tmp_path / name / "records.db"))
        return opened[-1]

    yield open_store
    for records in opened:
        records.close()


def test_a_session_opens_only_in_its_deployment_and_while_it_lasts(store: Callable[[str], Records]) -> None:
    sessions = SessionAuthority(store("a"))
    issued = sessions.issue("0123456789abcdef", now=NOW)
    opened = sessions.open(issued.cookie_value, now=NOW + 60)
    assert (opened.key_id, opened.csrf_token) == ("0123456789abcdef", issued.session.csrf_token)
    assert opened.expires_at == NOW + SESSION_TTL_SECONDS
    # The cookie carries no readable key id or CSRF token.
    assert "0123456789abcdef" not in issued.cookie_value
    assert issued.session.csrf_token not in issued.cookie_value
    # Another worker of this deployment (its own connection to the same store) opens it too.
    assert SessionAuthority(store("a")).open(issued.cookie_value, now=NOW).key_id == "0123456789abcdef"

    # Another deployment (another state directory): its store does not hold the session.
    assert (
        _reason(lambda: SessionAuthority(store("b")).open(issued.cookie_value, now=NOW))
        == "session_invalid_or_expired"
    )
    # Expired: 30 minutes after login, whatever happened in between.
    assert _reason(lambda: sessions.open(issued.cookie_value, now=NOW + SESSION_TTL_SECONDS + 1)) == (
        "session_invalid_or_expired"
    )
    # Issued "in the future" (a clock moved back): refused too.
    assert _reason(lambda: sessions.open(issued.cookie_value, now=NOW - 3600)) == "session_invalid_or_expired"


def test_the_store_holds_only_hashes(store: Callable[[str], Records]) -> None:
    records = store("a")
    issued = SessionAuthority(records).issue("0123456789abcdef", now=NOW)
    stored = " ".join(records.items("dashboard_sessions").values())
    secret = issued.cookie_value.split(".")[1]
    assert secret not in stored and issued.session.csrf_token not in stored
    # What the store holds is no cookie: the id with the stored hash in place of the secret fails.
    session_id = issued.cookie_value.split(".")[0]
    assert session_id in records.items("dashboard_sessions")
    for value in stored.split('"'):
        if len(value) == 64:  # a SHA-256, hex
            forged = f"{session_id}.{value[:43]}"
            assert _reason(lambda f=forged: SessionAuthority(records).open(f, now=NOW)).startswith("session_")


@pytest.mark.parametrize("position", [0, 10, 22, 23, 40, -1])
def test_a_tampered_cookie_is_refused(store: Callable[[str], Records], position: int) -> None:
    sessions = SessionAuthority(store("a"))
    cookie = sessions.issue("0123456789abcdef", now=NOW).cookie_value
    flipped = "A" if cookie[position] != "A" else "B"
    tampered = (
        cookie[:position] + flipped + cookie[position + 1 :] if position >= 0 else cookie[:-1] + flipped
    )
    assert tampered != cookie
    assert _reason(lambda: sessions.open(tampered, now=NOW)) in (
        "session_invalid_or_expired",
        "session_malformed",
    )


@pytest.mark.parametrize(
    "cookie",
    ["", "x", "é" * 10, "gAAAAA" + "A" * 2000, "null", "A" * 22 + "." + "B" * 43, "A" * 22 + "." * 44],
)
def test_garbage_is_refused(store: Callable[[str], Records], cookie: str) -> None:
    assert _reason(lambda: SessionAuthority(store("a")).open(cookie, now=NOW)).startswith("session_")


def test_an_ended_session_stays_ended_and_the_csrf_token_is_checked(store: Callable[[str], Records]) -> None:
    sessions = SessionAuthority(store("a"))
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


def test_expired_sessions_are_dropped_from_the_store(store: Callable[[str], Records]) -> None:
    records = store("a")
    sessions = SessionAuthority(records, ttl=60)
    for _ in range(3):
        sessions.issue("0123456789abcdef", now=NOW)
    ended = sessions.issue("0123456789abcdef", now=NOW)
    sessions.end(ended.session, now=NOW)
    assert len(records.items("dashboard_sessions")) == 4
    sessions.issue("0123456789abcdef", now=NOW + 61)  # a login after they expired sweeps them
    assert len(records.items("dashboard_sessions")) == 1


@pytest.fixture(params=["redis", "postgres"])
def shared(request: pytest.FixtureRequest) -> Iterator[Callable[[], Records]]:
    """shared(): a new connection to one namespace of a real Redis or PostgreSQL (a replica)."""
    opened: list[Records] = []
    if request.param == "redis":
        prefix = redis_prefix()

        def open_one() -> Records:
            opened.append(RedisRecords(REDIS_URL, prefix=prefix))
            return opened[-1]
    else:
        table = postgres_table()

        def open_one() -> Records:
            opened.append(PostgresRecords(POSTGRES_DSN, table=f"{table}_records"))
            return opened[-1]

    yield open_one
    for records in opened:
        records.close()
    if request.param == "redis":
        drop_redis_keys(prefix)
    else:
        drop_postgres_table(table)


def test_a_logout_on_one_replica_ends_the_session_on_the_other(shared: Callable[[], Records]) -> None:
    a, b = SessionAuthority(shared()), SessionAuthority(shared())
    issued = a.issue("0123456789abcdef", now=NOW)
    opened_on_b = b.open(issued.cookie_value, now=NOW + 1)  # cached on B now
    assert opened_on_b.csrf_token == issued.session.csrf_token  # B gives the page the same CSRF token
    a.end(a.open(issued.cookie_value, now=NOW + 2), now=NOW + 2)
    start = time.monotonic()
    while (reason := _refusal(b, issued.cookie_value)) is None:
        assert time.monotonic() - start < 1.0, "replica B still accepts a session ended on A"
        time.sleep(0.02)
    assert reason == "session_ended"
    assert time.monotonic() - start <= CHECK_EVERY + 0.2


def _refusal(sessions: SessionAuthority, cookie: str) -> str | None:
    try:
        sessions.open(cookie, now=NOW + 3)
    except AuthenticationFailed as e:
        return e.reason
    return None


# -- the identity stage --------------------------------------------------------------------------


class _Parts:
    def __init__(self, tmp_path: Path) -> None:
        self.keys = KeyStore(tmp_path / "keys.db")
        tokens = TokenAuthority(
            load_or_create_signing_key(tmp_path / "token.key"), issuer="b", audience="b", default_ttl=60
        )
        self.records = SQLiteRecords(tmp_path / "records.db")
        self.sessions = SessionAuthority(self.records)
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
    p.records.close()


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
    # Ended in the store too: every worker and replica refuses it, whatever key store it reads.
    assert _reason(lambda: parts.sessions.open(parts.issued.cookie_value, now=NOW + 6)) == "session_ended"


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
