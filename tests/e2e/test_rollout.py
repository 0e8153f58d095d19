"""A failing canary under steady load from a second process: added by a live reload (SIGHUP),
rolled back automatically within the window, while the stable version keeps serving and the
switch itself fails no request."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bastion.demo import feature_spec, infer_request, write_skops_model
from bastion.manifest import OutputSpec
from tests.helpers import create_key, run_cli, start_server, write_test_deployment

WINDOW = 10


def _write_failing_canary(build) -> Path:  # type: ignore[no-untyped-def]
    """Version 2 takes log() of its inputs: fine on the golden samples, fails on any zero feature."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer, StandardScaler

    data = load_breast_cancer()
    x = np.clip(data.data.astype(np.float32), 0.01, None)
    model = make_pipeline(FunctionTransformer(np.log), StandardScaler(), LogisticRegression(max_iter=2000))
    model.fit(x, data.target)
    src = build.root / "models" / "breast-cancer-v2"
    write_skops_model(
        src,
        model,
        [feature_spec(build.features)],
        OutputSpec(classes=[str(c) for c in data.target_names]),
        "breast-cancer",
    )
    manifest = json.loads((src / "manifest.json").read_text())
    manifest["version"] = "2"
    (src / "manifest.json").write_text(json.dumps(manifest))
    return build.publish(src)


def test_failing_canary_is_rolled_back_under_load(tmp_path: Path) -> None:
    config, build = write_test_deployment(tmp_path / "d")
    _write_failing_canary(build)
    key = create_key(config, "loader")
    server = start_server(config, tmp_path / "server.log")
    try:
        rows = build.features
        with_zero = [i for i in range(len(rows)) if (rows[i] == 0).any()][:5]
        without = [i for i in range(len(rows)) if not (rows[i] == 0).any()][:10]
        bodies = [infer_request(rows[i : i + 1]) for i in without + with_zero]  # a third of them hold a zero
        bodies_path = tmp_path / "bodies.json"
        bodies_path.write_text(json.dumps(bodies))
        out = tmp_path / "load.jsonl"
        url = f"{server.base_url}/v2/models/breast-cancer/infer"
        load = subprocess.Popen(
            [sys.executable, "-m", "tests.e2e.loadgen", url, key, str(bodies_path), "14", str(out)]
        )
        time.sleep(3)
        # Live reload: add version 2 as a canary taking half the unversioned traffic.
        text = config.read_text()
        canary = (
            '[[models]]\npath = "bundles/breast-cancer-2"\ntrusted_keys = ["keys/release.pub"]\n\n'
            f'[rollouts.breast-cancer]\nstable = "1"\ncanary = "2"\ncanary_weight = 0.5\nmax_error_rate = 0.05\n'
            f"window_seconds = {WINDOW}\nmin_requests = 10\n\n"
        )
        roles_at = text.index("[roles.analyst]")
        config.write_text(text[:roles_at] + canary + text[roles_at:])
        reloaded_at = time.time()
        server.process.send_signal(signal.SIGHUP)
        assert load.wait(timeout=60) == 0
    finally:
        server.stop()

    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(results) > 200
    # The load never saw the server stumble: no refused or reset connection, reload included.
    assert not [r for r in results if r["status"] == 0]
    # The stable version answered every request it got.
    assert {r["status"] for r in results if r["version"] == "1"} == {200}
    canary = [r for r in results if r["version"] == "2"]
    assert canary and all(r["sent"] > reloaded_at for r in canary)
    failed = [r for r in results if r["status"] != 200]
    assert failed and all(r["version"] == "2" and r["code"] == "inference_failed" for r in failed)

    conn = sqlite3.connect(tmp_path / "d" / "state" / "audit.db")
    records = [json.loads(b) for (b,) in conn.execute("SELECT body FROM records")]
    conn.close()
    rollbacks = [r for r in records if r["route"] == "rollout"]
    assert len(rollbacks) == 1 and rollbacks[0]["reason"] == "error_rate" and rollbacks[0]["version"] == "2"
    rolled_back_at = rollbacks[0]["ts"]
    first_canary_error = min(r["sent"] for r in failed)
    assert rolled_back_at - first_canary_error <= WINDOW  # within the window set in config
    # After the rollback, every request went to the stable version and succeeded.
    after = [r for r in results if r["sent"] > rolled_back_at + 0.05]
    assert after and all(r["version"] == "1" and r["status"] == 200 for r in after)
    # The model_load record for version 2 came with the reload.
    assert any(
        r["route"] == "model_load" and r["version"] == "2" and r["decision"] == "allow" for r in records
    )
    status = run_cli("rollout", "status", "--config", config).stdout
    assert "breast-cancer" in status and "rolled_back" in status
