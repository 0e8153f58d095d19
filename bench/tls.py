"""What TLS costs on the real server: keyed /infer (one row) over one keep-alive connection, and with a
new connection (a full handshake) per request; latency p50 and the server's CPU per request, plain
HTTP and TLS 1.3 alternating (two rounds each), on one fresh deployment.

    .venv/bin/python bench/tls.py

Server CPU is read from /proc (utime + stime of the server process) around each phase.
"""

from __future__ import annotations

import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers import BASTION, create_key, free_port, write_test_deployment
from tests.pki import Authority

from bastion.demo import infer_request

KEPT, FRESH = 1000, 200


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-tls-"))
    ca = Authority(root / "pki", "bench")
    server_cert = ca.issue("server", cn="127.0.0.1", server=True)
    config, build = write_test_deployment(root / "d")
    (root / "d" / "tls").mkdir()
    shutil.copy(server_cert.cert, root / "d" / "tls" / "server.pem")
    shutil.copy(server_cert.key, root / "d" / "tls" / "server.key")
    key = create_key(config, "loader")
    body = infer_request(np.asarray(build.features[:1], dtype=np.float32))
    plain = config.read_text()
    tls = plain + '\n[server.tls]\ncert_file = "tls/server.pem"\nkey_file = "tls/server.key"\n'
    verify = ssl.create_default_context(cafile=ca.pem)
    headers = {"Authorization": f"Bearer {key}"}
    for mode in ("plain", "tls", "plain", "tls"):
        config.write_text(tls if mode == "tls" else plain)
        port = free_port()
        url = f"{'https' if mode == 'tls' else 'http'}://127.0.0.1:{port}"
        process = subprocess.Popen(
            [*BASTION, "serve", "--config", str(config), "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def cpu(pid: int = process.pid) -> float:
            fields = Path(f"/proc/{pid}/stat").read_text().split()
            return (int(fields[13]) + int(fields[14])) / 100

        try:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"{url}/v2/health/ready", verify=verify, timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)
            infer = f"{url}/v2/models/breast-cancer/infer"
            with httpx.Client(verify=verify, headers=headers) as client:
                for _ in range(50):
                    client.post(infer, json=body)
                kept, start = [], cpu()
                for _ in range(KEPT):
                    t = time.perf_counter()
                    assert client.post(infer, json=body).status_code == 200
                    kept.append(time.perf_counter() - t)
                kept_cpu = (cpu() - start) / KEPT
            fresh, start = [], cpu()
            for _ in range(FRESH):
                t = time.perf_counter()
                with httpx.Client(verify=verify, headers=headers) as client:
                    assert client.post(infer, json=body).status_code == 200
                fresh.append(time.perf_counter() - t)
            fresh_cpu = (cpu() - start) / FRESH
            print(
                f"{mode:5}  keep-alive p50 {statistics.median(kept) * 1e3:5.2f} ms, server CPU "
                f"{kept_cpu * 1e6:5.0f} us/request;  new connection p50 {statistics.median(fresh) * 1e3:5.2f} ms, "
                f"server CPU {fresh_cpu * 1e6:5.0f} us/request",
                flush=True,
            )
        finally:
            process.terminate()
            process.wait(60)
    shutil.rmtree(root)


if __name__ == "__main__":
    main()
