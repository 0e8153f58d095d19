"""Identity: who is calling? API keys and short-lived tokens from `Authorization: Bearer ...`."""

from __future__ import annotations

from bastion.context import Principal, RequestContext
from bastion.errors import AuthenticationFailed
from bastion.keys import KEY_PREFIX, KeyStore
from bastion.tokens import TokenAuthority


class Authenticate:
    def __init__(self, keys: KeyStore, tokens: TokenAuthority, *, allow_tokens: bool = True) -> None:
        self._keys = keys
        self._tokens = tokens
        self._allow_tokens = allow_tokens

    async def __call__(self, ctx: RequestContext) -> None:
        header = ctx.credentials
        if not header:
            raise AuthenticationFailed("missing_credentials")
        scheme, _, credential = header.partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            raise AuthenticationFailed("bad_scheme")
        if credential.startswith(KEY_PREFIX):
            record = self._keys.authenticate(credential, now=ctx.now)
            ctx.principal = Principal(
                record.key_id, record.roles, quarantined=record.quarantined_at is not None
            )
            return
        if not self._allow_tokens:
            raise AuthenticationFailed("token_not_accepted_here")
        token = self._tokens.verify(credential, now=ctx.now)
        # The key behind the token is read on every request: revoking it kills its tokens at once.
        behind = self._keys.get(token.key_id)
        if behind is None:
            raise AuthenticationFailed("token_key_unknown")
        self._keys.require_active(behind, now=ctx.now)
        ctx.principal = Principal(
            behind.key_id,
            behind.roles,
            token.scope,
            via="token",
            quarantined=behind.quarantined_at is not None,
        )
