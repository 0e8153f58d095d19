"""A client certificate's validity and its CA's trust are checked once, at the handshake. On a connection
kept open (REST keep-alive, a gRPC channel kept busy), a certificate that expired, or whose CA was removed
from `client_ca_file` (the answer to a CA compromise), goes on authenticating every request."""

from __future__ import annotations

import datetime
import shutil
import ssl
import sys
import tempfile
import time
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import deploy

from bastion.demo import infer_request

LIFETIME = 8  # seconds


def short_lived(d, root: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Bastion Tests"),
                    x509.NameAttribute(NameOID.COMMON_NAME, "ingest"),
                ]
            )
        )
        .issuer_name(d.ca.name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(seconds=LIFETIME))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(d.ca.key, hashes.SHA256())
    )
    c, k = root / "short.pem", root / "short.key"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return c, k


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="rt-lifetime-"))
    d = deploy(
        root,
        client_auth="require",
        min_version="1.2",
        server_settings="head_timeout_seconds = 2\nkeep_alive_seconds = 5\n",
    )
    import tritonclient.grpc as triton

    try:
        cert, key = short_lived(d, root)
        ctx = ssl.create_default_context(cafile=d.ca.pem)
        ctx.load_cert_chain(cert, key)
        body = infer_request(d.rows)
        rest = httpx.Client(verify=ctx, timeout=10)
        grpc_client = triton.InferenceServerClient(
            f"127.0.0.1:{d.grpc_port}",
            ssl=True,
            root_certificates=str(d.ca.pem),
            private_key=str(key),
            certificate_chain=str(cert),
        )
        inp = triton.InferInput("features", list(d.rows.shape), "FP32")
        inp.set_data_from_numpy(d.rows)
        t0 = time.monotonic()
        ca_swapped = False
        while time.monotonic() - t0 < LIFETIME + 12:
            el = time.monotonic() - t0
            if el > LIFETIME + 3 and not ca_swapped:
                # the CA is removed from client_ca_file (another CA in its place) and reloaded
                shutil.copy(root / "pki" / "other-ca.pem", d.config.parent / "tls" / "ca.pem")
                ca_swapped = True
                time.sleep(1.5)
                print(f"+{el:.1f}s: client_ca_file now holds only another CA (reloaded)")
            r = rest.post(f"{d.url}/v2/models/breast-cancer/infer", json=body)
            try:
                grpc_client.infer("breast-cancer", [inp])
                g = "answered"
            except Exception as e:
                g = f"refused {str(e)[:60]}"
            state = "VALID" if el < LIFETIME else "EXPIRED"
            print(
                f"+{el:5.1f}s cert {state:7s} REST same connection: {r.status_code}  gRPC same channel: {g}"
            )
            time.sleep(1.0)
        # a new connection with the same (expired) certificate
        try:
            with httpx.Client(verify=ctx, timeout=10) as fresh:
                print(
                    "new REST connection:",
                    fresh.post(f"{d.url}/v2/models/breast-cancer/infer", json=body).status_code,
                )
        except httpx.TransportError as e:
            print("new REST connection: refused at handshake", type(e).__name__)
        rest.close()
        grpc_client.close()
    finally:
        d.server.stop()


if __name__ == "__main__":
    main()
