"""SIGKILL under load loses no acknowledged request from the audit log, and the chain still verifies."""

from __future__ import annotations

import json
import signal
import sqlite3
import threading
import time
from pathlib import Path

import httpx

from bastion.demo import infer_request
from tests.helpers import create_key, run_cli, start_server, write_test_deployment


def test_sigkill_under_load_loses_no_acknowledged_record(tmp_path: Path) -> None:
    config, build = write_test_deployment(tmp_path / "d")
    key = create_key(config, "loader")
    server = start_server(config, tmp_path / "server.log")
    acknowledged: list[str] = []
    stop = threading.Event()

    def load() -> None:
        body = infer_request(build.features[:1])
        with httpx.Client(
            base_url=server.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=5
        ) as c:
            while not stop.is_set():
                try:
                    r = c.post("/v2/models/breast-cancer/infer", json=body)
                except httpx.HTTPError:
                    return  # the server is gone
                if r.status_code == 200:
                    acknowledged.append(r.headers["x-request-id"])

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    server.process.send_signal(signal.SIGKILL)  # no shutdown, no final checkpoint, no flush
    server.process.wait()
    stop.set()
    for t in threads:
        t.join(timeout=10)
    assert len(acknowledged) > 100

    conn = sqlite3.connect(tmp_path / "d" / "state" / "audit.db")
    recorded = {json.loads(b).get("request_id") for (b,) in conn.execute("SELECT body FROM records")}
    conn.close()
    missing = [rid for rid in acknowledged if rid not in recorded]
    assert not missing, f"{len(missing)} acknowledged requests are not in the audit log"
    assert run_cli("audit", "verify", "--config", config).returncode == 0
