"""Identity: who is calling? API keys and short-lived tokens from `Authorization: Bearer ...`;
on the routes built with a `SessionAuthority`, a dashboard session too (`bastion.sessions`); on the
routes built with `CertificateIdentities`, a verified client certificate the policy maps (mTLS)."""

from __future__ import annotations

from bastion.certs import CertificateIdentities
from bastion.context import Principal, RequestContext, SessionCredentials
from bastion.errors import AuthenticationFailed
from bastion.keys import KEY_PREFIX, KeyRecords
from bastion.sessions import Session, SessionAuthority
from bastion.tokens import TokenAuthority


class Authenticate:
    def __init__(
        self,
        keys: KeyRecords,
        tokens: TokenAuthority,
        *,
        allow_tokens: bool = True,
        sessions: SessionAuthority | None = None,
        certificates: CertificateIdentities | None = None,
    ) -> None:
        """`sessions`: accept a dashboard session when no Authorization header is sent (the
        dashboard and admin routes only). `certificates`: accept a client certificate they map."""
        self._keys = keys
        self._tokens = tokens
        self._allow_tokens = allow_tokens
        self._sessions = sessions
        self._certificates = certificates

    async def __call__(self, ctx: RequestContext) -> None:
        header = ctx.credentials
        certificates = self._certificates
        if ctx.client_certificate is not None and ctx.client_certificate.refused is not None:
            # The connection's certificate no longer holds (expired, or its CA left client_ca_file since
            # the handshake: bastion.tls): nothing is answered on it, whatever else the request carries.
            raise AuthenticationFailed(ctx.client_certificate.refused)
        if ctx.client_certificate is not None and certificates is not None and self._certificate(ctx, certificates):
            return
        if not header and ctx.session is not None and self._sessions is not None:
            self._session(ctx, self._sessions)
            return
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
            token_id=token.jti,
        )

    def _certificate(self, ctx: RequestContext, certificates: CertificateIdentities) -> bool:
        """True when the client certificate names a principal (now set). A certificate the policy
        does not map is no credential: the request goes on as if it had none (a bearer may follow)."""
        cert = ctx.client_certificate
        assert cert is not None
        found = certificates.match(cert)
        if found is None:
            return False
        if ctx.credentials or ctx.session is not None:
            # Two credentials, possibly two principals: refused rather than one silently preferred.
            raise AuthenticationFailed("ambiguous_credentials")
        # Quarantine (query auditing) and revocation (`bastion keys revoke cert:<name>`) are kept in the
        # key store under the principal id (bastion.keys).
        record = self._keys.get(found.principal_id)
        if record is not None and record.revoked_at is not None:
            raise AuthenticationFailed("certificate_identity_revoked")
        ctx.principal = Principal(
            found.principal_id,
            found.roles,
            via="certificate",
            quarantined=record is not None and record.quarantined_at is not None,
            certificate=cert.public_key_sha256,
        )
        return True

    @staticmethod
    def _open(sessions: SessionAuthority, presented: SessionCredentials, now: float) -> Session:
        """The first of the cookies sent that opens a session: a junk cookie of the same name that a
        page on another port of this host set with a longer Path (the browser sends it first) must
        not hide the operator's real one. None opening: the first one's refusal."""
        try:
            return sessions.open(presented.cookie, now=now)
        except AuthenticationFailed as first:
            for other in presented.others:
                try:
                    return sessions.open(other, now=now)
                except AuthenticationFailed:
                    continue
            raise first from None

    def _session(self, ctx: RequestContext, sessions: SessionAuthority) -> None:
        """The session's cookie opened, its CSRF secret checked when the request changes state,
        and its key read now: revoked or expired, the key fails; quarantined, the session ends."""
        presented = ctx.session
        assert presented is not None
        if presented.cross_site and presented.state_changing:
            # SameSite=Strict keeps the cookie off cross-site requests already; a browser that says
            # the request is cross-site is refused all the same.
            raise AuthenticationFailed("session_cross_site")
        session = self._open(sessions, presented, ctx.now)
        if presented.state_changing:
            sessions.require_csrf(session, presented.csrf_token)
        record = self._keys.get(session.key_id)
        if record is None:
            raise AuthenticationFailed("session_key_unknown")
        try:
            self._keys.require_active(record, now=ctx.now)
        except AuthenticationFailed:
            sessions.end(session, now=ctx.now)  # revoked or expired: ended in the store, for every replica
            raise
        if record.quarantined_at is not None:
            sessions.end(session, now=ctx.now)
            raise AuthenticationFailed("session_key_quarantined")
        ctx.principal = Principal(record.key_id, record.roles, via="session")
        ctx.session_open = session
