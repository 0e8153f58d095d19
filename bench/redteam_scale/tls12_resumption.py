"""TLS 1.2 session resumption by session ID (OP_NO_TICKET does not stop it): is a session resumed, and
does a resumed session carry the client certificate without verifying it again?"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import deploy

from bastion.demo import infer_request


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="rt-resume-"))
    d = deploy(root, client_auth="optional", min_version="1.2", grpc=False)
    try:
        sess = root / "sess.pem"
        body = json.dumps(infer_request(d.rows))
        req = (
            f"POST /v2/models/breast-cancer/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}"
        ).encode()
        c = d.certs["ingest"]
        base = [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{d.port}",
            "-tls1_2",
            "-CAfile",
            str(d.ca.pem),
            "-ign_eof",
        ]
        first = subprocess.run(
            base + ["-cert", str(c.cert), "-key", str(c.key), "-sess_out", str(sess)],
            input=req,
            capture_output=True,
            timeout=20,
        ).stdout.decode(errors="replace")
        print(
            "first (with ingest cert):",
            [ln for ln in first.splitlines() if ln.startswith(("HTTP/", "New", "Reused"))],
        )
        second = subprocess.run(
            base + ["-sess_in", str(sess)], input=req, capture_output=True, timeout=20
        ).stdout.decode(errors="replace")
        print(
            "second (no cert, -sess_in):",
            [ln for ln in second.splitlines() if ln.startswith(("HTTP/", "New", "Reused"))],
        )
        # A certificate valid 8 s: the session outlives it, and outlives its CA leaving client_ca_file.
        import shutil
        import time

        from cert_lifetime_on_open_connection import short_lived

        sc, sk = short_lived(d, root)
        sess2 = root / "sess2.pem"
        first = subprocess.run(
            base + ["-cert", str(sc), "-key", str(sk), "-sess_out", str(sess2)],
            input=req,
            capture_output=True,
            timeout=20,
        ).stdout.decode(errors="replace")
        print(
            "short-lived cert, first:",
            [ln for ln in first.splitlines() if ln.startswith(("HTTP/", "New", "Reused"))],
        )
        time.sleep(10)
        fresh = subprocess.run(
            base + ["-cert", str(sc), "-key", str(sk)], input=req, capture_output=True, timeout=20
        ).stdout.decode(errors="replace")
        print(
            "expired cert, full handshake:",
            [ln for ln in fresh.splitlines() if ln.startswith(("HTTP/", "New", "Reused"))] or "refused",
        )
        again = subprocess.run(
            base + ["-sess_in", str(sess2)], input=req, capture_output=True, timeout=20
        ).stdout.decode(errors="replace")
        print(
            "expired cert, resumed session, no cert sent:",
            [ln for ln in again.splitlines() if ln.startswith(("HTTP/", "New", "Reused"))],
        )
        shutil.copy(root / "pki" / "other-ca.pem", d.config.parent / "tls" / "ca.pem")
        time.sleep(2)
        again = subprocess.run(
            base + ["-sess_in", str(sess2)], input=req, capture_output=True, timeout=20
        ).stdout.decode(errors="replace")
        print(
            "after the CA left client_ca_file (reloaded), resumed:",
            [ln for ln in again.splitlines() if ln.startswith(("HTTP/", "New", "Reused"))],
        )
        log = d.log()
        print("reloaded:", "TLS certificate reloaded" in log)
    finally:
        d.server.stop()


if __name__ == "__main__":
    main()
