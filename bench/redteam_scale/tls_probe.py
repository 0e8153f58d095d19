"""Protocol probes against REST and gRPC TLS ports with openssl s_client: versions, suites, renegotiation,
plaintext to the TLS port. Usage: tls_probe.py [min_version] [client_auth]"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import deploy


def s_client(port: int, ca: Path, cert: Path, key: Path, *args: str, stdin: bytes = b"") -> str:
    cmd = [
        "openssl",
        "s_client",
        "-connect",
        f"127.0.0.1:{port}",
        "-CAfile",
        str(ca),
        "-cert",
        str(cert),
        "-key",
        str(key),
        *args,
    ]
    p = subprocess.run(cmd, input=stdin, capture_output=True, timeout=20)
    out = (p.stdout + p.stderr).decode(errors="replace")
    proto = next((ln.strip() for ln in out.splitlines() if ln.strip().startswith("Protocol")), "")
    cipher = next((ln.strip() for ln in out.splitlines() if "Cipher is" in ln), "")
    return f"{'HANDSHAKE OK' if 'Cipher is (NONE)' not in out and cipher else 'refused'} | {proto} | {cipher}"


def main() -> None:
    min_version = sys.argv[1] if len(sys.argv) > 1 else "1.3"
    client_auth = sys.argv[2] if len(sys.argv) > 2 else "require"
    d = deploy(Path(tempfile.mkdtemp(prefix="rt-tls-")), client_auth=client_auth, min_version=min_version)
    c = d.certs["stranger"]
    try:
        print(f"min_version = {min_version}, client_auth = {client_auth}")
        for name, port in (("REST", d.port), ("gRPC", d.grpc_port)):
            print(f"--- {name} :{port}")
            for label, args in [
                ("TLS1.3", ["-tls1_3"]),
                ("TLS1.2 any", ["-tls1_2"]),
                ("TLS1.2 ECDHE-ECDSA-AES128-SHA (CBC)", ["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA"]),
                (
                    "TLS1.2 ECDHE-ECDSA-AES256-SHA384 (CBC)",
                    ["-tls1_2", "-cipher", "ECDHE-ECDSA-AES256-SHA384"],
                ),
                ("TLS1.2 AES128-GCM-SHA256 (static RSA)", ["-tls1_2", "-cipher", "AES128-GCM-SHA256"]),
                ("TLS1.1", ["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"]),
                ("TLS1.0", ["-tls1", "-cipher", "DEFAULT@SECLEVEL=0"]),
            ]:
                print(f"{label:42s} {s_client(port, d.ca.pem, c.cert, c.key, *args)}")
    finally:
        d.server.stop()


if __name__ == "__main__":
    main()
