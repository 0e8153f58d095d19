"""A throwaway PKI for the TLS tests, made with `cryptography`: a CA, a server certificate for
127.0.0.1, client certificates by subject and by SPIFFE ID, an expired one and one from another CA,
any validity window, and `malleate`: a certificate re-encoded by its holder (no CA key needed)."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SPIFFE_SCORER = "spiffe://bastion.test/ns/prod/sa/scorer"


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path
    serial: int
    fingerprint: str  # SHA-256 of the DER certificate, hex
    public_key_sha256: str  # SHA-256 of its SubjectPublicKeyInfo, hex (what revocation matches)


def _name(cn: str, org: str = "Bastion Tests") -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org), x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    )


class Authority:
    """A CA that writes what it issues into `root` as PEM files."""

    def __init__(self, root: Path, name: str) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.name = _name(f"{name} CA")
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )
        self.pem = root / f"{name}-ca.pem"
        self.pem.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        self,
        file_name: str,
        *,
        cn: str,
        server: bool = False,
        spiffe_id: str | None = None,
        expired: bool = False,
        valid_from: datetime.datetime | None = None,
        valid_until: datetime.datetime | None = None,
    ) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        start, end = (
            (now - datetime.timedelta(days=10), now - datetime.timedelta(days=1))
            if expired
            else (now - datetime.timedelta(hours=1), now + datetime.timedelta(days=7))
        )
        start, end = valid_from or start, valid_until or end
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        names: list[x509.GeneralName] = []
        if server:
            names += [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
        if spiffe_id is not None:
            names.append(x509.UniformResourceIdentifier(spiffe_id))
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        cert_path, key_path = self.root / f"{file_name}.pem", self.root / f"{file_name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        key_path.chmod(0o600)
        der = cert.public_bytes(serialization.Encoding.DER)
        spki = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return Issued(
            cert_path,
            key_path,
            cert.serial_number,
            hashlib.sha256(der).hexdigest(),
            hashlib.sha256(spki).hexdigest(),
        )


_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def malleate(pem: bytes) -> bytes:
    """The same P-256 certificate with its ECDSA signature (r, s) re-encoded as (r, n - s): as valid for
    the CA's key, another DER (so another SHA-256 of the certificate). Anyone holding it can do this."""
    cert = x509.load_pem_x509_certificate(pem)
    der = cert.public_bytes(serialization.Encoding.DER)
    r, s = decode_dss_signature(cert.signature)
    signature = encode_dss_signature(r, _P256_ORDER - s)
    old_bits = b"\x03" + _der_length(len(cert.signature) + 1) + b"\x00" + cert.signature
    assert der.endswith(old_bits)
    tbs = cert.tbs_certificate_bytes
    start = der.index(tbs)
    algorithm = der[start + len(tbs) : len(der) - len(old_bits)]
    bits = b"\x03" + _der_length(len(signature) + 1) + b"\x00" + signature
    body = tbs + algorithm + bits
    twin = x509.load_der_x509_certificate(b"\x30" + _der_length(len(body)) + body)
    return twin.public_bytes(serialization.Encoding.PEM)
