"""Token revocation (the deny list, bastion.tokens.TokenRevocations) from the attacker's side, on
SQLite (the state directory's records.db, shared by workers), a real Redis and a real PostgreSQL:
two authorities on one store stand for two replicas. A revoked token is refused on the other within
a second (measured); a forged token carrying a revoked jti, or a revoked token re-sent with a
changed header, is refused; a refused token adds nothing to the list; entries expire."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from joserfc.jwk import OKPKey

from bastion.config import Action
from bastion.errors import AuthenticationFailed
from bastion.policy import TokenScope
from bastion.records import CHECK_EVERY, Records
from bastion.records.postgres import PostgresRecords
from bastion.records.redis import RedisRecords
from bastion.records.sqlite import SQLiteRecords
from bastion.tokens import JTI, MAX_TTL_SECONDS, TokenAuthority, TokenRevocations
from tests.helpers import (
    POSTGRES_DSN,
    REDIS_URL,
    drop_postgres_table,
    drop_redis_keys,
    postgres_table,
    redis_prefix,
)

SCOPE = TokenScope(frozenset({(Action.INFER, "m")}), None)
KEY = OKPKey.generate_key("Ed25519", private=True)


@pytest.fixture(params=["sqlite", "redis", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Records]]:
    """store(): a new connection to one store (a worker or a replica)."""
    opened: list[Records] = []
    prefix = table = ""

    def open_one() -> Records:
        if request.param == "sqlite":
            opened.append(SQLiteRecords(tmp_path / "records.db"))
        elif request.param == "redis":
            opened.append(RedisRecords(REDIS_URL, prefix=prefix))
        else:
            opened.append(PostgresRecords(POSTGRES_DSN, table=f"{table}_records"))
        return opened[-1]

    if request.param == "redis":
        prefix = redis_prefix()
    elif request.param == "postgres":
        table = postgres_table()
    yield open_one
    for records in opened:
        records.close()
    if request.param == "redis":
        drop_redis_keys(prefix)
    elif request.param == "postgres":
        drop_postgres_table(table)


def _authority(records: Records, key: OKPKey = KEY) -> TokenAuthority:
    return TokenAuthority(
        key, issuer="b", audience="b", default_ttl=900, revocations=TokenRevocations(records)
    )


def _reason(call: Callable[[], object]) -> str:
    with pytest.raises(AuthenticationFailed) as caught:
        call()
    return caught.value.reason


def _refusal(auth: TokenAuthority, token: str, now: float) -> str | None:
    """The reason `auth` refuses `token`, or None when it accepts it."""
    try:
        auth.verify(token, now=now)
    except AuthenticationFailed as e:
        return e.reason
    return None


def _refused_within(auth: TokenAuthority, token: str, limit: float = 1.0, now: float | None = None) -> float:
    start = time.monotonic()
    while (reason := _refusal(auth, token, time.time() if now is None else now)) is None:
        assert time.monotonic() - start < limit, f"still accepted after {limit} s"
        time.sleep(0.01)
    assert reason == "token_revoked"
    return time.monotonic() - start


def test_a_token_revoked_on_one_replica_is_refused_by_the_other_within_a_second(
    store: Callable[[], Records],
) -> None:
    a, b = _authority(store()), _authority(store())
    minted = a.mint(key_id="k1", scope=SCOPE, now=time.time())
    other = a.mint(key_id="k1", scope=SCOPE, now=time.time())
    assert JTI.fullmatch(minted.jti) and minted.jti != other.jti
    assert b.verify(minted.token, now=time.time()).jti == minted.jti  # accepted, and cached, on B
    assert a.revocations is not None
    a.revocations.revoke(minted.jti, now=time.time())
    assert _refused_within(a, minted.token, limit=0.05) < 0.05  # where it was revoked: at once
    delay = _refused_within(b, minted.token)
    assert delay <= CHECK_EVERY + 0.2, f"replica B accepted a revoked token for {delay:.3f} s"
    assert b.verify(other.token, now=time.time()).key_id == "k1"  # its sibling is untouched
    # Revoking again changes nothing and is no error.
    a.revocations.revoke(minted.jti, now=time.time())
    assert [e.jti for e in a.revocations.list(now=time.time())] == [minted.jti]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def test_a_revoked_token_stays_refused_however_it_is_dressed(store: Callable[[], Records]) -> None:
    auth = _authority(store())
    now = time.time()
    minted = auth.mint(key_id="k1", scope=SCOPE, now=now)
    assert auth.revocations is not None
    auth.revocations.revoke(minted.jti, now=now)
    header, claims, signature = minted.token.split(".")
    variants = {
        # Another header (a kid, another typ, the generic EdDSA name): the signature no longer matches.
        "kid": _b64(json.dumps({"alg": "Ed25519", "typ": "JWT", "kid": "x"}).encode()),
        "typ": _b64(json.dumps({"typ": "at+jwt", "alg": "Ed25519"}).encode()),
        "eddsa": _b64(json.dumps({"alg": "EdDSA", "typ": "JWT"}).encode()),
        "none": _b64(json.dumps({"alg": "none"}).encode()),
    }
    for name, forged_header in variants.items():
        token = f"{forged_header}.{claims}.{signature}"
        assert _reason(lambda t=token: auth.verify(t, now=now + 1)).startswith("token_"), name
    # The same header and claims signed again, by a key that is not the server's (a forger's): refused
    # as forged, whatever jti it carries; and the genuine one stays revoked from the cache.
    forger = _authority(store(), OKPKey.generate_key("Ed25519", private=True))
    forged = forger.mint(key_id="k1", scope=SCOPE, now=now).token
    doc = json.loads(_unb64(forged.split(".")[1]))
    doc["jti"] = minted.jti
    forged_claims = _b64(json.dumps(doc).encode())
    assert _reason(lambda: auth.verify(f"{header}.{forged_claims}.{signature}", now=now + 1)) == (
        "token_bad_signature"
    )
    assert _reason(lambda: auth.verify(minted.token, now=now + 1)) == "token_revoked"
    assert _reason(lambda: auth.verify(minted.token, now=now + 2)) == "token_revoked"


def test_a_refused_token_adds_nothing_to_the_list(store: Callable[[], Records]) -> None:
    records = store()
    auth = _authority(records)
    now = time.time()
    minted = auth.mint(key_id="k1", scope=SCOPE, now=now)
    before = records.version("token_revocations")
    # A flipped signature: its first character changed (an Ed25519 signature's last characters are
    # often "A" already, S being below 2^253, so replacing them may change nothing).
    head, _, signature = minted.token.rpartition(".")
    flipped = f"{head}.{'B' if signature[0] != 'B' else 'C'}{signature[1:]}"
    for token in (flipped, "a.b.c", minted.token + "x", "x" * 100):
        with pytest.raises(AuthenticationFailed):
            auth.verify(token, now=now)
    auth.verify(minted.token, now=now)
    assert records.version("token_revocations") == before and records.items("token_revocations") == {}


def test_revoke_before_kills_a_keys_older_tokens_only(store: Callable[[], Records]) -> None:
    a, b = _authority(store()), _authority(store())
    assert a.revocations is not None
    old = a.mint(key_id="k1", scope=SCOPE, now=1_000.0)
    other_key = a.mint(key_id="k2", scope=SCOPE, now=1_000.0)
    b.verify(old.token, now=1_100.0)
    a.revocations.revoke_before("k1", before=1_200.5, now=1_200.5)
    fresh = a.mint(key_id="k1", scope=SCOPE, now=1_201.0)
    assert _refused_within(b, old.token, now=1_201.0) < 1.0
    assert b.verify(fresh.token, now=1_202.0).key_id == "k1"
    assert b.verify(other_key.token, now=1_202.0).key_id == "k2"
    # An earlier time later changes nothing; a time in the future counts as now (no token minted
    # later is refused in advance).
    a.revocations.revoke_before("k1", before=1_100.0, now=1_300.0)
    with pytest.raises(AuthenticationFailed):
        b.verify(old.token, now=1_300.0)
    assert a.revocations.revoke_before("k1", before=10_000.0, now=1_300.5).before == 1_300.5
    later = a.mint(key_id="k1", scope=SCOPE, now=1_302.0)
    assert _refusal(a, later.token, 1_303.0) is None


def test_entries_outlive_every_token_they_refuse_then_go(store: Callable[[], Records]) -> None:
    records = store()
    auth = _authority(records)
    revocations = auth.revocations
    assert revocations is not None
    minted = auth.mint(key_id="k1", scope=SCOPE, now=1_000.0)
    revocations.revoke(minted.jti, now=1_000.0)
    with pytest.raises(AuthenticationFailed):
        auth.verify(minted.token, now=1_100.0)
    # The longest-lived token issued at the revocation would have expired by now: the entry goes
    # with the next revocation, and the list does not grow without end.
    later = 1_000.0 + MAX_TTL_SECONDS + 120
    revocations.revoke("A" * 16, now=later)
    assert [e.jti for e in revocations.list(now=later)] == ["A" * 16]
    assert set(records.items("token_revocations")) == {"jti:" + "A" * 16}


@pytest.mark.parametrize("jti", ["", "short", "A" * 17, "A" * 15 + "!", "A" * 15 + "\n", "../" * 6])
def test_only_a_jti_as_issued_can_be_listed(tmp_path: Path, jti: str) -> None:
    records = SQLiteRecords(tmp_path / "records.db")
    with pytest.raises(ValueError, match="16 characters"):
        TokenRevocations(records).revoke(jti, now=1_000.0)
    assert records.items("token_revocations") == {}
    records.close()
