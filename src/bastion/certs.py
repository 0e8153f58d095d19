"""Client certificates as service identities: a verified certificate's subject or SPIFFE ID names a
principal (`cert:<name>`) and its roles, as `[[client_certificates.identities]]` in the policy file says.

The TLS layer (bastion.tls) has verified the chain against `[server.tls] client_ca_file` before any of
this runs, and re-checks it per request (validity window, issuer still trusted); here a certificate is
only *read*: its subject as an RFC 4514 string, its SPIFFE ID (an X509-SVID carries exactly one URI SAN,
`spiffe://trust-domain/path`), and the SHA-256 of its SubjectPublicKeyInfo, which revocation matches
and the audit record carries (never the certificate). Not a hash of the certificate's DER: an ECDSA
signature (r, s) is as valid as (r, n - s), so anyone holding a certificate can re-encode it into
another DER that still verifies; the public key is signed by the CA and cannot change. Deny by default:
a certificate no identity names is no principal at all.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from bastion.config import CertificateIdentity, Config
from bastion.errors import AuthenticationFailed, ConfigError
from bastion.keys import CERT_PRINCIPAL_PREFIX

# Where an HTTP front end puts a connection's verified certificate in the ASGI scope:
# scope["extensions"]["tls"][CLIENT_CERTIFICATE] (the ASGI TLS extension's dictionary).
CLIENT_CERTIFICATE = "bastion.client_certificate"


@dataclass(frozen=True, slots=True)
class ClientCertificate:
    """What a verified client certificate says: its subject (RFC 4514), its SPIFFE ID (None unless it has
    exactly one URI SAN and that is a `spiffe://` URI), the SHA-256 of its SubjectPublicKeyInfo (64 hex
    digits: what revocation matches and the audit carries), its validity window (Unix seconds) and its
    DER (for re-checking its issuer). `refused`: why the transport no longer trusts it for this request
    (bastion.tls `ServerTls.check_client`), None while it holds."""

    subject: str
    spiffe_id: str | None
    public_key_sha256: str
    not_before: float = float("-inf")
    not_after: float = float("inf")
    der: bytes = field(default=b"", repr=False)
    refused: str | None = None


def public_key_sha256(cert: x509.Certificate) -> str:
    """SHA-256 (hex) of the certificate's DER SubjectPublicKeyInfo: as
    `openssl x509 -in cert.pem -noout -pubkey | openssl pkey -pubin -outform DER | sha256sum`."""
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


@lru_cache(maxsize=1024)
def read_certificate(der: bytes) -> ClientCertificate | None:
    """The identity fields of a DER certificate; None if it cannot be parsed (then it names no one).
    Cached: a client sends the same certificate on every connection."""
    try:
        cert = x509.load_der_x509_certificate(der)
        subject = cert.subject.rfc4514_string()
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            uris = []
        spki = public_key_sha256(cert)
    except (ValueError, UnsupportedAlgorithm):
        return None
    spiffe = uris[0] if len(uris) == 1 and uris[0].startswith("spiffe://") else None
    return ClientCertificate(
        subject,
        spiffe,
        spki,
        cert.not_valid_before_utc.timestamp(),
        cert.not_valid_after_utc.timestamp(),
        der,
    )


def read_pem_certificate(pem: bytes) -> ClientCertificate | None:
    """As `read_certificate`, from PEM (gRPC's auth context carries the peer's certificate as PEM)."""
    try:
        der = x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)
    except ValueError:
        return None
    return read_certificate(der)


def _canonical_subject(subject: str) -> str:
    """One spelling per name: the config's string as cryptography writes a certificate's subject."""
    return x509.Name.from_rfc4514_string(subject).rfc4514_string()


@dataclass(frozen=True, slots=True)
class CertificatePrincipal:
    principal_id: str  # "cert:<name>": never equal to an API key's "key:<id>"
    roles: tuple[str, ...]


class CertificateIdentities:
    """The policy's mapping from certificates to principals; rebuilt with the pipelines on reload."""

    def __init__(self, identities: list[CertificateIdentity], revoked: list[str]) -> None:
        """`revoked`: SHA-256 (hex) of the SubjectPublicKeyInfo of certificates refused whatever they map to."""
        self._by_subject: dict[str, CertificatePrincipal] = {}
        self._by_spiffe: dict[str, CertificatePrincipal] = {}
        for identity in identities:
            found = CertificatePrincipal(CERT_PRINCIPAL_PREFIX + identity.name, tuple(identity.roles))
            if identity.subject is not None:
                self._by_subject[_canonical_subject(identity.subject)] = found
            if identity.spiffe_id is not None:
                self._by_spiffe[identity.spiffe_id] = found
        self._revoked = frozenset(revoked)

    @classmethod
    def from_config(cls, config: Config) -> CertificateIdentities | None:
        """None when no identity is configured: certificates then name no one."""
        settings = config.client_certificates
        if not settings.identities:
            return None
        return cls(settings.identities, settings.revoked_public_keys)

    def match(self, cert: ClientCertificate) -> CertificatePrincipal | None:
        """The principal `cert` names, or None (deny by default).

        Raises AuthenticationFailed for a revoked public key, or a certificate whose subject and
        SPIFFE ID name two different identities (no precedence to get wrong).
        """
        if cert.public_key_sha256 in self._revoked:
            raise AuthenticationFailed("certificate_revoked")
        by_spiffe = self._by_spiffe.get(cert.spiffe_id) if cert.spiffe_id is not None else None
        by_subject = self._by_subject.get(cert.subject)
        if by_spiffe is not None and by_subject is not None and by_spiffe != by_subject:
            raise AuthenticationFailed("certificate_ambiguous")
        return by_spiffe or by_subject


def check_identities(config: Config, path: Path) -> None:
    """Refuse identities that could not work, naming the field: an unknown role, a name, subject or
    SPIFFE ID given twice, or identities while no client certificate is asked for (they would be ignored);
    and `[server.tls] min_version = "1.3"` with gRPC enabled, which gRPC could not enforce."""
    settings = config.client_certificates
    where = f"{path}: client_certificates"
    tls = config.server.tls
    if tls is not None and tls.min_version == "1.3" and config.grpc.enabled:
        # grpcio's Python API sets no TLS version: gRPC would go on negotiating TLS 1.2.
        raise ConfigError(
            f'{path}: server.tls.min_version: "1.3" cannot be enforced on gRPC ([grpc] enabled: grpcio '
            'offers no TLS version setting, it would negotiate TLS 1.2): use "1.2", or disable [grpc]'
        )
    if (settings.identities or settings.revoked_public_keys) and (tls is None or tls.client_auth == "none"):
        raise ConfigError(
            f"{where}: client certificates are not asked for ([server.tls] client_auth is not "
            '"optional" or "require"): they would be ignored'
        )
    seen: dict[str, int] = {}
    for i, identity in enumerate(settings.identities):
        for role in identity.roles:
            if role not in config.roles:
                raise ConfigError(
                    f"{where}.identities.{i}.roles: no role {role!r} "
                    f"(declared: {', '.join(sorted(config.roles)) or 'none'})"
                )
        keys = [f"name {identity.name!r}"]
        if identity.subject is not None:
            keys.append(f"subject {_canonical_subject(identity.subject)!r}")
        if identity.spiffe_id is not None:
            keys.append(f"spiffe_id {identity.spiffe_id!r}")
        for key in keys:
            if key in seen:
                raise ConfigError(f"{where}.identities.{i}: {key} is also identities.{seen[key]}'s")
            seen[key] = i
