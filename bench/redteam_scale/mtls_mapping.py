"""Client certificates against the mapping: look-alike subjects and SPIFFE IDs, two credentials, forged
chains, validity and EKU, over REST (optional) and gRPC (require). Prints one line per probe."""

from __future__ import annotations

import datetime
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import deploy

from bastion.demo import infer_request

SPIFFE = "spiffe://bastion.test/ns/prod/sa/scorer"


def issue(
    root: Path,
    fname: str,
    issuer_name,
    issuer_key,
    *,
    subject: x509.Name,
    uris=(),
    eku=("client",),
    start=-1.0,
    end=7.0,
    ca=False,
    chain_extra: bytes = b"",
) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + datetime.timedelta(days=start))
        .not_valid_after(now + datetime.timedelta(days=end))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if eku:
        oids = {"client": ExtendedKeyUsageOID.CLIENT_AUTH, "server": ExtendedKeyUsageOID.SERVER_AUTH}
        b = b.add_extension(x509.ExtendedKeyUsage([oids[e] for e in eku]), critical=False)
    if uris:
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), critical=False
        )
    cert = b.sign(issuer_key, hashes.SHA256())
    c, k = root / f"{fname}.pem", root / f"{fname}.key"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + chain_extra)
    k.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return c, k


def name(*pairs) -> x509.Name:
    return x509.Name([x509.NameAttribute(oid, v) for oid, v in pairs])


O, CN, OU = NameOID.ORGANIZATION_NAME, NameOID.COMMON_NAME, NameOID.ORGANIZATIONAL_UNIT_NAME


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="rt-mtls-"))
    d = deploy(root, client_auth="optional", min_version="1.2")
    ca = d.ca
    out = root / "probes"
    out.mkdir()
    body = infer_request(d.rows)
    stranger_cert = x509.load_pem_x509_certificate(d.certs["stranger"].cert.read_bytes())
    stranger_key = serialization.load_pem_private_key(d.certs["stranger"].key.read_bytes(), None)
    probes = {
        "exact subject (control)": dict(subject=name((O, "Bastion Tests"), (CN, "ingest"))),
        "subject case O=bastion tests": dict(subject=name((O, "bastion tests"), (CN, "ingest"))),
        "subject order CN first": dict(subject=name((CN, "ingest"), (O, "Bastion Tests"))),
        "subject + OU": dict(subject=name((O, "Bastion Tests"), (OU, "x"), (CN, "ingest"))),
        "CN with escaped comma": dict(subject=name((CN, "ingest,O=Bastion Tests"))),
        "spiffe exact (control)": dict(subject=name((CN, "w")), uris=[SPIFFE]),
        "spiffe trailing slash": dict(subject=name((CN, "w")), uris=[SPIFFE + "/"]),
        "spiffe other trust domain": dict(
            subject=name((CN, "w")), uris=[SPIFFE.replace("bastion.test", "evil.test")]
        ),
        "spiffe %73corer": dict(subject=name((CN, "w")), uris=[SPIFFE.replace("scorer", "%73corer")]),
        "spiffe upper-case host": dict(
            subject=name((CN, "w")), uris=[SPIFFE.replace("bastion.test", "BASTION.test")]
        ),
        "SPIFFE:// scheme upper": dict(subject=name((CN, "w")), uris=[SPIFFE.replace("spiffe", "SPIFFE", 1)]),
        "two URI SANs (scorer + other)": dict(
            subject=name((CN, "w")), uris=[SPIFFE, "spiffe://bastion.test/x"]
        ),
        "mapped subject + unmapped spiffe": dict(
            subject=name((O, "Bastion Tests"), (CN, "ingest")), uris=["spiffe://bastion.test/unmapped"]
        ),
        "mapped subject + scorer spiffe (two ids)": dict(
            subject=name((O, "Bastion Tests"), (CN, "ingest")), uris=[SPIFFE]
        ),
        "expired": dict(subject=name((O, "Bastion Tests"), (CN, "ingest")), start=-10, end=-1),
        "not yet valid": dict(subject=name((O, "Bastion Tests"), (CN, "ingest")), start=1, end=7),
        "EKU serverAuth only": dict(subject=name((O, "Bastion Tests"), (CN, "ingest")), eku=("server",)),
        "no EKU": dict(subject=name((O, "Bastion Tests"), (CN, "ingest")), eku=()),
        "leaf with CA=true": dict(subject=name((O, "Bastion Tests"), (CN, "ingest")), ca=True),
    }
    made = {}
    for label, kw in probes.items():
        made[label] = issue(out, label.replace(" ", "_").replace("/", "_"), ca.name, ca.key, **kw)
    # A certificate signed by the holder of a valid leaf (stranger, CA=false), chain sent along.
    made["forged under stranger leaf"] = issue(
        out,
        "forged",
        stranger_cert.subject,
        stranger_key,
        subject=name((O, "Bastion Tests"), (CN, "ingest")),
        chain_extra=d.certs["stranger"].cert.read_bytes(),
    )
    for label, (cert, key) in made.items():
        ctx = ssl.create_default_context(cafile=ca.pem)
        ctx.load_cert_chain(cert, key)
        try:
            with httpx.Client(verify=ctx, timeout=10) as http:
                r = http.post(
                    f"{d.url}/v2/models/loan/metadata" if False else f"{d.url}/v2/models/breast-cancer/infer",
                    json=body,
                )
                who = (
                    r.json().get("outputs", [{}])[0].get("name")
                    if r.status_code == 200
                    else r.json().get("code")
                )
                extra = ""
                if r.status_code == 200:
                    # admin (scorer) gets probabilities; analyst (ingest) gets label only
                    extra = " -> admin" if len(r.json()["outputs"]) > 1 else " -> analyst"
            print(f"{label:42s} {r.status_code} {who}{extra}")
        except (httpx.TransportError, ssl.SSLError) as e:
            print(f"{label:42s} handshake refused ({type(e).__name__}: {str(e)[:60]})")
    # two credentials
    ingest = d.certs["ingest"]
    for label, cert, hdr in [
        ("mapped cert + admin key", ingest, {"Authorization": f"Bearer {d.keys['admin']}"}),
        ("unmapped cert + admin key", d.certs["stranger"], {"Authorization": f"Bearer {d.keys['admin']}"}),
        ("revoked cert + admin key", d.certs["revoked"], {"Authorization": f"Bearer {d.keys['admin']}"}),
        ("mapped cert + garbage Authorization", ingest, {"Authorization": "Basic Zm9vOmJhcg=="}),
        ("mapped cert + empty Authorization", ingest, {"Authorization": ""}),
        ("mapped cert + Cookie session junk", ingest, {"Cookie": "__Host-bastion_session=a.b"}),
    ]:
        ctx = ssl.create_default_context(cafile=ca.pem)
        ctx.load_cert_chain(cert.cert, cert.key)
        with httpx.Client(verify=ctx, timeout=10, headers=hdr) as http:
            r = http.post(f"{d.url}/v2/models/breast-cancer/infer", json=body)
        print(f"{label:42s} {r.status_code} {r.text[:90]}")
    # service identity trying to mint a token / open a session
    ctx = ssl.create_default_context(cafile=ca.pem)
    ctx.load_cert_chain(ingest.cert, ingest.key)
    with httpx.Client(verify=ctx, timeout=10) as http:
        r = http.post(f"{d.url}/v2/auth/token", json={})
        print(f"{'mapped cert -> /v2/auth/token':42s} {r.status_code} {r.text[:90]}")
    # renegotiation on TLS 1.2 (client-initiated)
    p = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{d.port}", "-tls1_2", "-CAfile", str(ca.pem)],
        input=b"R\n",
        capture_output=True,
        timeout=20,
    )
    txt = (p.stdout + p.stderr).decode(errors="replace")
    print(
        "renegotiation TLS1.2:",
        "RENEGOTIATING" in txt
        and (
            "refused/closed" if "no renegotiation" in txt or "alert" in txt.lower() or p.returncode else "?"
        ),
        [ln for ln in txt.splitlines() if "renegotiat" in ln.lower() or "alert" in ln.lower()][:3],
    )
    # plaintext to the TLS port
    try:
        r = httpx.get(f"http://127.0.0.1:{d.port}/v2/health/live", timeout=5)
        print("plaintext HTTP to TLS port:", r.status_code, r.text[:80])
    except httpx.TransportError as e:
        print("plaintext HTTP to TLS port: no answer", type(e).__name__)
    log = d.log()
    print("log mentions PRIVATE KEY/BEGIN CERT:", "PRIVATE KEY" in log, "BEGIN CERT" in log)
    d.server.stop()
    print("root", root)


if __name__ == "__main__":
    main()
