"""Red-team harness (issue 13 parts 2, 4, 5): a real `bastion serve` with TLS/mTLS, gRPC, and a PKI.

Usage from the other scripts: `deploy(root, client_auth=..., min_version=..., extra=...)` -> Deployment.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tests.helpers import BASTION, RunningServer, create_key, free_port, write_test_deployment
from tests.pki import SPIFFE_SCORER, Authority, Issued


@dataclass
class Deployment:
    root: Path
    config: Path
    server: RunningServer
    port: int
    grpc_port: int
    ca: Authority
    certs: dict[str, Issued]
    keys: dict[str, str]
    rows: np.ndarray

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.server.log_path.read_text(errors="replace")


def make_pki(root: Path) -> tuple[Authority, dict[str, Issued]]:
    ca, other = Authority(root, "test"), Authority(root, "other")
    certs = {
        "server": ca.issue("server", cn="127.0.0.1", server=True),
        "ingest": ca.issue("ingest", cn="ingest"),
        "scorer": ca.issue("scorer", cn="scorer-workload", spiffe_id=SPIFFE_SCORER),
        "stranger": ca.issue("stranger", cn="stranger"),
        "revoked": ca.issue("revoked", cn="ingest"),
        "foreign": other.issue("foreign", cn="ingest"),
    }
    return ca, certs


def deploy(
    root: Path,
    *,
    client_auth: str = "optional",
    min_version: str = "1.2",
    extra: str = "",
    server_settings: str = "head_timeout_seconds = 2\n",
    state: str | None = None,
    keys: tuple[str, ...] = ("analyst", "admin"),
    grpc: bool = True,
) -> Deployment:
    root.mkdir(parents=True, exist_ok=True)
    ca, certs = make_pki(root / "pki")
    grpc_port = free_port()
    tls = f"""
[server.tls]
cert_file = "tls/server.pem"
key_file = "tls/server.key"
client_ca_file = "tls/ca.pem"
client_auth = "{client_auth}"
min_version = "{min_version}"
reload_interval_seconds = 0.5
"""
    if grpc:
        tls += f"\n[grpc]\nenabled = true\nport = {grpc_port}\n"
    tls += f"""
[client_certificates]
revoked_public_keys = ["{certs["revoked"].public_key_sha256}"]

[[client_certificates.identities]]
name = "ingest"
subject = "CN=ingest,O=Bastion Tests"
roles = ["analyst"]

[[client_certificates.identities]]
name = "scorer"
spiffe_id = "{SPIFFE_SCORER}"
roles = ["admin"]
"""
    config, build = write_test_deployment(root / "d", extra=tls + extra)
    text = config.read_text().replace("[server]\n", f"[server]\n{server_settings}", 1)
    if state is not None:
        # replace the [state] section's body
        import re

        text = re.sub(r"\[state\]\n(?:[^\[\n][^\n]*\n|\n)*", f"[state]\n{state}\n", text, count=1)
    config.write_text(text)
    tls_dir = root / "d" / "tls"
    tls_dir.mkdir()
    shutil.copy(certs["server"].cert, tls_dir / "server.pem")
    shutil.copy(certs["server"].key, tls_dir / "server.key")
    shutil.copy(ca.pem, tls_dir / "ca.pem")
    (tls_dir / "server.key").chmod(0o600)
    made = {role: create_key(config, role) for role in keys}
    server, port = start(config, root / "server.log", ca, certs)
    return Deployment(
        root,
        config,
        server,
        port,
        grpc_port,
        ca,
        certs,
        made,
        np.asarray(build.features[:2], dtype=np.float32),
    )


def start(
    config: Path, log: Path, ca: Authority, certs: dict[str, Issued], *extra: str
) -> tuple[RunningServer, int]:
    import ssl

    port = free_port()
    process = subprocess.Popen(
        [*BASTION, "serve", "--config", str(config), "--port", str(port), *extra],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    server = RunningServer(f"https://127.0.0.1:{port}", config, process, log)
    ctx = ssl.create_default_context(cafile=ca.pem)
    ctx.load_cert_chain(certs["stranger"].cert, certs["stranger"].key)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited: {log.read_text()}")
        try:
            with httpx.Client(verify=ctx, timeout=1) as http:
                if http.get(f"https://127.0.0.1:{port}/v2/health/live").status_code == 200:
                    return server, port
        except httpx.TransportError:
            time.sleep(0.2)
    server.stop()
    raise AssertionError("no start")
