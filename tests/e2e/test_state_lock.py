"""A second `bastion serve` on a running server's state directory refuses to start, names the
directory and the PID holding it, and leaves the first server untouched (it used to turn every
answer of the first into 503 audit_unavailable: two writers of one audit chain)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from bastion.demo import infer_request
from tests.helpers import BASTION, create_key, free_port, run_cli, start_server, write_test_deployment


def test_second_server_on_the_same_state_dir_refuses_and_the_first_is_unaffected(tmp_path: Path) -> None:
    config, build = write_test_deployment(tmp_path / "dep")
    key = create_key(config, "analyst")
    first = start_server(config, tmp_path / "first.log")
    try:
        with first.client(key) as c:
            assert c.post("/v2/models/breast-cancer/infer", json=infer_request(build.features[:1])).is_success
        second = subprocess.run(
            [*BASTION, "serve", "--config", str(config), "--port", str(free_port())],
            capture_output=True,
            text=True,
            timeout=60,
        )
        state_dir = tmp_path / "dep" / "state"
        assert second.returncode != 0
        assert str(state_dir) in second.stderr
        assert f"pid {first.process.pid}" in second.stderr
        assert "Traceback" not in second.stderr + second.stdout
        # The first server still answers a keyed request, several times (the fault showed on the next commit).
        with first.client(key) as c:
            for i in range(3):
                r = c.post("/v2/models/breast-cancer/infer", json=infer_request(build.features[i : i + 1]))
                assert r.status_code == 200, r.text
        # Admin commands do not take the lock: they work beside the running server.
        other = create_key(config, "analyst")
        listed = run_cli("keys", "list", "--config", config).stdout
        assert other.split("_")[1] in listed
        run_cli("keys", "revoke", "--config", config, other.split("_")[1])
        with first.client(other) as c:
            assert c.get("/v2/models/breast-cancer").status_code == 401
        verified = run_cli("audit", "verify", "--config", config)
        assert verified.stdout.startswith("OK:"), verified.stdout
    finally:
        first.stop()
    # The lock goes with the server: the directory can be served again, and the chain still verifies.
    again = start_server(config, tmp_path / "again.log")
    try:
        with again.client(key) as c:
            assert c.get("/v2/models/breast-cancer").status_code == 200
    finally:
        again.stop()
    assert run_cli("audit", "verify", "--config", config).stdout.startswith("OK:")
