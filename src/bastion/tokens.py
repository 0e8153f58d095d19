"""Short-lived scoped tokens: EdDSA (Ed25519) JWTs through joserfc.

Only `alg: Ed25519` is accepted: `none`, HMAC and RSA headers fail before any
key is used, so an algorithm swap cannot turn our public key into an HMAC
secret. Issuer, audience, expiry and not-before are all required. A token names
its key, and the key's status is read on every request, so revoking a key kills
its tokens at once.

One token dies alone through the deny list (`TokenRevocations`): its `jti` (shown to its owner in
the token response, and in the audit records of its issue and of every request made with it), or
every token of a key issued before a time ("revoke-before"). The list lives in `bastion.records`
(Redis or PostgreSQL shared by every replica; a SQLite file in the state directory otherwise) and is
held in memory by each process, re-read when its change counter moved (checked every 0.25 s).
Entries are dropped once every token they could refuse has expired (`MAX_TTL_SECONDS`). Only
admins write it (`bastion tokens revoke`, `POST /v2/admin/tokens/{jti}/revoke`); a client never
learns whether a jti is on it: a revoked token gets the same 401 as a forged or expired one.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import OKPKey
from joserfc.jwt import JWTClaimsRegistry

from bastion.config import Action, OutputDetail
from bastion.errors import AuthenticationFailed
from bastion.files import write_private_file
from bastion.policy import TokenScope
from bastion.records import UNCHANGED, Records, Watch, update

ALGORITHM = "Ed25519"  # RFC 9864 fully specified name for EdDSA over Ed25519
_CACHE_MAX = 10_000
# A compact JWS: three base64url segments, ASCII only. Anything else (a JWE, whitespace, padding, a
# character outside the alphabet, a string that is not even UTF-8) is refused before it is hashed or parsed.
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
# Our tokens run to a few hundred characters; a token request's body (4 KiB at most) cannot make one
# larger than about 6 KiB. Longer strings are refused unparsed.
MAX_TOKEN_CHARS = 16_384
# No token lives longer than tokens.ttl_seconds' upper bound, whatever the setting was when it was
# issued: a deny-list entry kept this long (plus clock slack) outlives every token it can refuse.
MAX_TTL_SECONDS = 86_400
_CLOCK_SLACK = 60  # seconds: replicas' clocks differ a little
# A jti as issued (token_urlsafe(12): 16 characters); an admin's input is checked against it.
JTI = re.compile(r"[A-Za-z0-9_-]{16}")


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    key_id: str
    scope: TokenScope
    expires_at: float
    jti: str = ""
    issued_at: float = 0.0  # the `iat` claim, Unix seconds (whole)


@dataclass(frozen=True, slots=True)
class IssuedToken:
    token: str  # for the caller only: never logged, never audited
    jti: str  # the token's id: what an admin revokes it by
    expires_in: int  # seconds
    expires_at: int  # Unix seconds


def load_or_create_signing_key(path: Path) -> OKPKey:
    """The server's token signing key, created on first start with owner-only permissions."""
    if path.exists():
        return OKPKey.import_key(json.loads(path.read_text(encoding="utf-8")))
    key = OKPKey.generate_key("Ed25519", private=True)
    write_private_file(path, json.dumps(key.as_dict(private=True)).encode())
    return key


class TokenAuthority:
    def __init__(
        self,
        signing_key: OKPKey,
        *,
        issuer: str,
        audience: str,
        default_ttl: int,
        revocations: TokenRevocations | None = None,
    ) -> None:
        """`revocations`: the deny list read on every verification (None: none kept, as in unit tests)."""
        self._signing_key = signing_key
        self.revocations = revocations
        self._verify_key = OKPKey.import_key(signing_key.as_dict(private=False))
        self.issuer = issuer
        self.audience = audience
        self.default_ttl = default_ttl
        # Verified tokens are remembered until they expire: one Ed25519 verify per token, not per request.
        self._verified: dict[bytes, VerifiedToken] = {}

    def issue(self, *, key_id: str, scope: TokenScope, now: float, ttl: int | None = None) -> tuple[str, int]:
        """(token, seconds it lives); `mint` also gives its jti."""
        minted = self.mint(key_id=key_id, scope=scope, now=now, ttl=ttl)
        return minted.token, minted.expires_in

    def mint(self, *, key_id: str, scope: TokenScope, now: float, ttl: int | None = None) -> IssuedToken:
        """A token for `key_id` narrowed to `scope`, living `ttl` seconds (at most `default_ttl`)."""
        ttl = self.default_ttl if ttl is None else min(ttl, self.default_ttl)
        issued = int(now)
        jti = secrets.token_urlsafe(12)
        while jti.startswith("-"):  # would read as an option on `bastion tokens revoke`'s command line
            jti = secrets.token_urlsafe(12)
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": key_id,
            "iat": issued,
            "nbf": issued,
            "exp": issued + ttl,
            "jti": jti,
            "scope": scope.encode(),
        }
        if scope.output is not None:
            claims["output"] = scope.output.value
        token = jwt.encode(
            {"alg": ALGORITHM, "typ": "JWT"}, claims, self._signing_key, algorithms=[ALGORITHM]
        )
        return IssuedToken(token, jti, ttl, issued + ttl)

    def verify(self, token: str, *, now: float) -> VerifiedToken:
        """The token's key id and scope, or AuthenticationFailed (its `reason` names the check; a
        revoked token's is `token_revoked`). The deny list is read after the signature: a forged token
        is refused as forged whatever its jti. StateUnavailable when the deny list cannot be read."""
        verified = self._verify(token, now=now)
        if self.revocations is not None:
            self.revocations.check(verified, now=now)
        return verified

    def _verify(self, token: str, *, now: float) -> VerifiedToken:
        if len(token) > MAX_TOKEN_CHARS or _COMPACT_JWS.fullmatch(token) is None:
            raise AuthenticationFailed("token_malformed")
        digest = hashlib.sha256(token.encode("ascii")).digest()
        cached = self._verified.get(digest)
        if cached is not None:
            if now < cached.expires_at:
                return cached
            del self._verified[digest]
            raise AuthenticationFailed("token_expired")
        try:
            decoded = jwt.decode(token, self._verify_key, algorithms=[ALGORITHM])
            JWTClaimsRegistry(
                now=int(now),
                iss={"essential": True, "value": self.issuer},
                aud={"essential": True, "value": self.audience},
                sub={"essential": True},
                exp={"essential": True},
                nbf={"essential": True},
                iat={"essential": True},
                jti={"essential": True},
            ).validate(decoded.claims)
        except JoseError as e:
            raise AuthenticationFailed(f"token_{e.error}") from None
        except (ValueError, TypeError):  # malformed base64/JSON inside the token
            raise AuthenticationFailed("token_malformed") from None
        verified = _claims_to_token(decoded.claims)
        if len(self._verified) >= _CACHE_MAX:
            self._verified.clear()
        self._verified[digest] = verified
        return verified


def _claims_to_token(claims: dict[str, Any]) -> VerifiedToken:
    try:
        pairs = set()
        for item in claims["scope"]:
            action, _, model = str(item).partition(":")
            pairs.add((Action(action), model))
        output = OutputDetail(claims["output"]) if "output" in claims else None
        return VerifiedToken(
            str(claims["sub"]),
            TokenScope(frozenset(pairs), output),
            float(claims["exp"]),
            str(claims["jti"]),
            float(claims["iat"]),
        )
    except (KeyError, ValueError, TypeError):
        raise AuthenticationFailed("token_bad_scope") from None


_REVOCATIONS = "token_revocations"  # the collection: "jti:<jti>" and "key:<key id>" records


@dataclass(frozen=True, slots=True)
class Revocation:
    """One deny-list entry: a token by its jti, or a key's tokens issued before `before`."""

    jti: str | None
    key_id: str | None
    before: float | None  # Unix seconds; with key_id
    until: float  # Unix seconds: dropped after this (every token it could refuse has expired)

    def as_dict(self) -> dict[str, Any]:
        return {"jti": self.jti, "key_id": self.key_id, "before": self.before, "until": self.until}


class TokenRevocations:
    """The deny list, over `Records` (shared by replicas, or the state directory's SQLite file).

    `check` is the request path: dictionary lookups in memory; the whole (small: only revoked,
    unexpired entries) list is re-read when its counter moved, which is read at most every 0.25 s, so
    a revocation made anywhere is enforced everywhere within that. `revoke` and `revoke_before` are
    the admin's; each also drops expired entries. Every method raises `StateUnavailable` when the
    store cannot be read (a token is then refused with 503, never served unchecked).
    """

    def __init__(self, records: Records, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._records = records
        self._watch = Watch(records, _REVOCATIONS, clock=clock)
        self._lock = threading.Lock()
        self._jtis: dict[str, float] = {}  # jti -> until
        self._before: dict[str, tuple[float, float]] = {}  # key id -> (before, until)

    def check(self, token: VerifiedToken, *, now: float) -> None:
        """Raises AuthenticationFailed("token_revoked") if `token` is on the list."""
        with self._lock:
            if self._watch.stale():
                self._load()
            until = self._jtis.get(token.jti)
            before = self._before.get(token.key_id)
        if until is not None and now < until:
            raise AuthenticationFailed("token_revoked")
        # `iat` is whole seconds, rounded down: a token issued in the second of a revoke-before but
        # after it is refused too (the owner asks for another); none issued before it survives.
        if before is not None and now < before[1] and token.issued_at < before[0]:
            raise AuthenticationFailed("token_revoked")

    def _load(self) -> None:
        jtis: dict[str, float] = {}
        before: dict[str, tuple[float, float]] = {}
        for name, text in self._records.items(_REVOCATIONS).items():
            doc = json.loads(text)
            kind, _, value = name.partition(":")
            if kind == "jti":
                jtis[value] = float(doc["until"])
            elif kind == "key":
                before[value] = (float(doc["before"]), float(doc["until"]))
        self._jtis, self._before = jtis, before

    def revoke(self, jti: str, *, now: float) -> Revocation:
        """Refuse the token whose jti is `jti` from now on, on every replica (within 0.25 s).
        Idempotent. ValueError for a string that is not a jti as this server issues them."""
        if JTI.fullmatch(jti) is None:
            raise ValueError("a jti is 16 characters of A-Z, a-z, 0-9, '-' and '_'")
        until = now + MAX_TTL_SECONDS + _CLOCK_SLACK
        update(self._records, _REVOCATIONS, f"jti:{jti}", lambda current: _later(current, {"until": until}))
        self._changed(now)
        return Revocation(jti, None, None, until)

    def revoke_before(self, key_id: str, *, before: float, now: float) -> Revocation:
        """Refuse every token of `key_id` issued before `before` (Unix seconds; a time in the future
        counts as `now`: tokens not issued yet are not revoked, the key may mint new ones). A later
        call with an earlier time changes nothing."""
        before = min(before, now)
        entry = {"before": before, "until": before + MAX_TTL_SECONDS + _CLOCK_SLACK}
        update(self._records, _REVOCATIONS, f"key:{key_id}", lambda current: _later(current, entry))
        self._changed(now)
        return Revocation(None, key_id, before, float(entry["until"]))

    def list(self, *, now: float) -> list[Revocation]:
        """The entries still in force, oldest expiry first."""
        found = []
        for name, text in self._records.items(_REVOCATIONS).items():
            doc = json.loads(text)
            if float(doc["until"]) <= now:
                continue
            kind, _, value = name.partition(":")
            if kind == "jti":
                found.append(Revocation(value, None, None, float(doc["until"])))
            else:
                found.append(Revocation(None, value, float(doc["before"]), float(doc["until"])))
        return sorted(found, key=lambda r: r.until)

    def _changed(self, now: float) -> None:
        """Drop the entries that outlived every token they could refuse; read the list anew."""
        for name, text in self._records.items(_REVOCATIONS).items():
            if float(json.loads(text)["until"]) <= now:
                self._records.swap(_REVOCATIONS, name, text, None)  # lost to another writer: theirs stands
        with self._lock:
            self._watch.invalidate()


def _later(current: dict[str, Any] | None, entry: dict[str, float]) -> Any:
    """The entry that refuses more: the new one unless the stored one already reaches as far."""
    if current is not None and all(float(current.get(k, 0.0)) >= v for k, v in entry.items()):
        return UNCHANGED
    return entry
