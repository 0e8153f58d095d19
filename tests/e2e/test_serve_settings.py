"""`[server] host` and `port` are where `bastion serve` listens when no flag overrides them."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import httpx

from tests.helpers import BASTION, free_port, write_test_deployment


def test_serve_listens_on_the_policy_files_host_and_port(tmp_path: Path) -> None:
    port = free_port()
    config, _ = write_test_deployment(tmp_path, port=port)
    text = config.read_text()
    assert f"port = {port}" in text and 'host = "127.0.0.1"' in text
    log = (tmp_path / "serve.log").open("wb")
    process = subprocess.Popen([*BASTION, "serve", "--config", str(config)], stdout=log, stderr=log)
    try:
        deadline, answered = time.monotonic() + 60, None
        while time.monotonic() < deadline and answered is None and process.poll() is None:
            try:
                answered = httpx.get(f"http://127.0.0.1:{port}/v2/health/live", timeout=1).status_code
            except httpx.TransportError:
                time.sleep(0.1)
        assert answered == 200
        # Only on the configured host: the loopback address 127.0.0.2 reaches nothing on that port.
        try:
            other = httpx.get(f"http://127.0.0.2:{port}/v2/health/live", timeout=1).status_code
        except httpx.TransportError:
            other = None
        assert other is None
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=20)
