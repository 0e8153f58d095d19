"""Shared setup for bench/redteam_issue10: a real demo deployment (REST + gRPC) to attack.

Point the scripts at a running `bastion demo` with BASTION_HTTP (host:port), BASTION_GRPC
(host:port), ANALYST and ADMIN (its keys) and BASTION_DEMO_DIR; without them, `demo()` starts one
in a temporary directory on free ports and stops it at exit.
"""

from __future__ import annotations

import atexit
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tests.helpers import free_port  # noqa: E402


@dataclass
class Demo:
    http: str  # host:port
    grpc: str  # host:port
    analyst: str
    admin: str
    dir: Path

    def auth(self, role: str = "analyst") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.analyst if role == 'analyst' else self.admin}"}

    def url(self, path: str) -> str:
        return f"http://{self.http}{path}"


def demo() -> Demo:
    env = os.environ
    if env.get("BASTION_HTTP"):
        return Demo(
            env["BASTION_HTTP"],
            env["BASTION_GRPC"],
            env["ANALYST"],
            env["ADMIN"],
            Path(env.get("BASTION_DEMO_DIR", ".")),
        )
    tmp = Path(tempfile.mkdtemp(prefix="rt10-"))
    port = free_port()
    grpc_port = free_port()
    log = (tmp / "demo.log").open("w")
    proc = subprocess.Popen(
        [
            str(ROOT / ".venv/bin/bastion"),
            "demo",
            "--dir",
            str(tmp / "demo"),
            "--port",
            str(port),
            "--grpc-port",
            str(grpc_port),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    atexit.register(lambda: (os.killpg(proc.pid, signal.SIGINT), proc.wait(30)))
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    text = (tmp / "demo.log").read_text()
    keys = dict(re.findall(r"export (ANALYST|ADMIN)=(\S+)", text))
    return Demo(f"127.0.0.1:{port}", f"127.0.0.1:{grpc_port}", keys["ANALYST"], keys["ADMIN"], tmp / "demo")
