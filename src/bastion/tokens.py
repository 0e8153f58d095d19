"""Short-lived scoped tokens: EdDSA (Ed25519) JWTs through joserfc.

Only `alg: Ed25519` is accepted: `none`, HMAC and RSA headers fail before any
key is used, so an algorithm swap cannot turn our public key into an HMAC
secret. Issuer, audience, expiry and not-before are all required. A token names
its key, and the key's status is read on every request, so revoking a key kills
its tokens at once.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
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

ALGORITHM = "Ed25519"  # RFC 9864 fully specified name for EdDSA over Ed25519
_CACHE_MAX = 10_000
# A compact JWS: three base64url segments, ASCII only. Anything else (a JWE, whitespace, padding, a
# character outside the alphabet, a string that is not even UTF-8) is refused before it is hashed or parsed.
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
# Our tokens run to a few hundred characters; a token request's body (4 KiB at most) cannot make one
# larger than about 6 KiB. Longer strings are refused unparsed.
MAX_TOKEN_CHARS = 16_384


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    key_id: str
    scope: TokenScope
    expires_at: float


def load_or_create_signing_key(path: Path) -> OKPKey:
    """The server's token signing key, created on first start with owner-only permissions."""
    if path.exists():
        return OKPKey.import_key(json.loads(path.read_text(encoding="utf-8")))
    key = OKPKey.generate_key("Ed25519", private=True)
    write_private_file(path, json.dumps(key.as_dict(private=True)).encode())
    return key


class TokenAuthority:
    def __init__(self, signing_key: OKPKey, *, issuer: str, audience: str, default_ttl: int) -> None:
        self._signing_key = signing_key
        self._verify_key = OKPKey.import_key(signing_key.as_dict(private=False))
        self.issuer = issuer
        self.audience = audience
        self.default_ttl = default_ttl
        # Verified tokens are remembered until they expire: one Ed25519 verify per token, not per request.
        self._verified: dict[bytes, VerifiedToken] = {}

    def issue(self, *, key_id: str, scope: TokenScope, now: float, ttl: int | None = None) -> tuple[str, int]:
        ttl = self.default_ttl if ttl is None else min(ttl, self.default_ttl)
        issued = int(now)
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": key_id,
            "iat": issued,
            "nbf": issued,
            "exp": issued + ttl,
            "jti": secrets.token_urlsafe(12),
            "scope": scope.encode(),
        }
        if scope.output is not None:
            claims["output"] = scope.output.value
        token = jwt.encode(
            {"alg": ALGORITHM, "typ": "JWT"}, claims, self._signing_key, algorithms=[ALGORITHM]
        )
        return token, ttl

    def verify(self, token: str, *, now: float) -> VerifiedToken:
        """The token's key id and scope, or AuthenticationFailed (its `reason` names the check)."""
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
        return VerifiedToken(str(claims["sub"]), TokenScope(frozenset(pairs), output), float(claims["exp"]))
    except (KeyError, ValueError, TypeError):
        raise AuthenticationFailed("token_bad_scope") from None
