"""The containment ladder over HTTP, from the attacker's side: a thief probing around seed rows climbs
throttle -> degrade -> quarantine on one model, and isolate on another; an operator lifts each, and
every step is in the audit log."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from bastion.demo import infer_request
from tests.helpers import RunningServer, create_key, start_server, write_test_deployment

pytestmark = pytest.mark.slow


@dataclass
class Ladder:
    server: RunningServer
    root: Path
    thief: str
    admin: str
    x: np.ndarray


@pytest.fixture(scope="module")
def ladder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ladder]:
    root = tmp_path_factory.mktemp("ladder")
    config, build = write_test_deployment(root)
    text = config.read_text()
    # breast-cancer climbs throttle (20 requests a second), degrade (to label), quarantine.
    text = text.replace(
        'path = "bundles/breast-cancer-1"\ntrusted_keys = ["keys/release.pub"]\n',
        'path = "bundles/breast-cancer-1"\ntrusted_keys = ["keys/release.pub"]\n'
        'containment = ["throttle", "degrade", "quarantine"]\nthrottle_rate = 20\n',
        1,
    )
    # The shared deployment serves diabetes already: its ladder is one step, isolate.
    at = text.index("\n", text.index("trusted_keys", text.index('"bundles/diabetes-1"'))) + 1
    text = text[:at] + 'containment = ["isolate"]\n' + text[at:]
    config.write_text(text)
    thief, admin = create_key(config, "admin"), create_key(config, "admin")
    server = start_server(config, root / "server.log")
    yield Ladder(server, root, thief, admin, build.features)
    server.stop()


def _incident_steps(server: RunningServer, admin: str, thief: str) -> list[str]:
    """The containment steps taken on the thief, oldest first, read over the admin API."""
    with server.client(admin) as client:
        listed = client.get("/v2/admin/incidents").json()["incidents"]
    return [i["action"] for i in reversed(listed) if i["principal"] == f"key:{thief.split('_')[1]}"]


def _probe_until_step(ladder: Ladder, path: str, seed: int, step: str, features: np.ndarray) -> list[int]:
    """Probe seed rows by +-1% of a standard deviation, 15 a second (under the throttle), until the
    ladder takes `step` on the thief; the statuses seen."""
    rng = np.random.default_rng(seed)
    seeds, spread = features[200 + 5 * seed : 205 + 5 * seed], features.std(axis=0)
    statuses: list[int] = []
    with ladder.server.client(ladder.thief) as thief:
        for i in range(150):
            row = seeds[i % len(seeds)] + 0.01 * spread * np.sign(rng.standard_normal(features.shape[1]))
            statuses.append(thief.post(path, json=infer_request(row[None].astype(np.float32))).status_code)
            if i % 5 == 4 and step in _incident_steps(ladder.server, ladder.admin, ladder.thief):
                return statuses
            time.sleep(1 / 15)
    raise AssertionError(f"{step} never taken: {statuses[-10:]}")


def _audit(root: Path) -> list[dict[str, object]]:
    with sqlite3.connect(root / "state" / "audit.db") as db:
        return [json.loads(b) for (b,) in db.execute("SELECT body FROM records ORDER BY seq")]


def test_a_thief_climbs_the_ladder_and_an_operator_lifts_it(ladder: Ladder) -> None:
    server, x, infer = ladder.server, ladder.x, "/v2/models/breast-cancer/infer"
    row = infer_request(x[:1])
    thief_id = ladder.thief.split("_")[1]

    # Rung 1, throttle: past 20 requests a second on this model, 429 throttled; other keys unaffected.
    _probe_until_step(ladder, infer, 0, "throttle", x)
    with server.client(ladder.thief) as thief:
        burst = [thief.post(infer, json=row) for _ in range(40)]
    refused = [r for r in burst if r.status_code == 429]
    assert refused and {r.json()["code"] for r in refused} == {"throttled"}
    # In rows, not requests: a batch bigger than the throttle's bucket is refused outright.
    time.sleep(2.0)
    with server.client(ladder.thief) as thief:
        batch = thief.post(infer, json=infer_request(x[:40]))
    assert (batch.status_code, batch.json()["code"]) == (429, "throttled")
    with server.client(ladder.admin) as other:
        assert all(other.post(infer, json=row).status_code == 200 for _ in range(40))
        # The operator sees the step (the dashboard's summary), with what and until when.
        contained = other.get("/v2/admin/summary").json()["contained"]
    assert [(c["principal"], c["step"], c["value"]) for c in contained] == [
        (f"key:{thief_id}", "throttle", "20.0")
    ]

    # Rung 2, degrade: the key's grant is probabilities; its answers are now labels only.
    time.sleep(1.0)
    _probe_until_step(ladder, infer, 1, "degrade", x)
    time.sleep(0.2)
    with server.client(ladder.thief) as thief:
        outputs = {o["name"] for o in thief.post(infer, json=row).json()["outputs"]}
    assert outputs == {"label"}
    with server.client(ladder.admin) as other:
        assert "probabilities" in {o["name"] for o in other.post(infer, json=row).json()["outputs"]}

    # Rung 3, quarantine: refused everywhere.
    statuses = _probe_until_step(ladder, infer, 2, "quarantine", x)
    assert statuses[-1] == 403 or 403 in statuses

    # The operator lifts everything at once (admin API), and the key is served in full again.
    with server.client(ladder.admin) as admin:
        assert admin.post(f"/v2/admin/keys/{thief_id}/release").status_code == 200
    with server.client(ladder.thief) as thief:
        answered = thief.post(infer, json=row)
        assert answered.status_code == 200
        assert "probabilities" in {o["name"] for o in answered.json()["outputs"]}
        assert all(thief.post(infer, json=row).status_code == 200 for _ in range(30))  # not throttled

    records = _audit(ladder.root)
    steps = [
        r["decision"]
        for r in records
        if r.get("route") == "incident" and r.get("principal") == f"key:{thief_id}"
    ]
    assert steps == ["throttle", "degrade", "quarantine"]
    assert any(r.get("route") == "key_release" and r.get("target") == f"key:{thief_id}" for r in records)


def test_isolation_as_a_step_and_its_release(ladder: Ladder) -> None:
    from bastion.demo import train_regressor

    _, features = train_regressor()
    path = "/v2/models/diabetes/infer"
    thief = create_key(ladder.server.config, "admin")
    ladder_for = Ladder(ladder.server, ladder.root, thief, ladder.admin, features)
    statuses = _probe_until_step(ladder_for, path, 0, "isolate", features)
    assert 503 in statuses[-3:]
    row = infer_request(features[:1].astype(np.float32))
    with ladder.server.client(ladder.admin) as admin:
        refused = admin.post(path, json=row)  # everyone, not only the thief
        assert (refused.status_code, refused.json()["code"]) == (503, "model_isolated")
        assert (
            admin.post("/v2/models/breast-cancer/infer", json=infer_request(ladder.x[:1])).status_code == 200
        )
        assert admin.post("/v2/admin/models/diabetes/release").status_code == 200
        assert admin.post(path, json=row).status_code == 200


def test_reroute_keeps_a_flagged_principal_on_the_stable_version(tmp_path: Path) -> None:
    """During a rollout, the reroute step sends a flagged principal's unversioned requests to the
    stable version only, while other keys still reach the canary; a release lifts it."""
    from bastion.demo import feature_spec, write_skops_model
    from bastion.manifest import OutputSpec

    config, build = write_test_deployment(tmp_path / "d")
    x = build.features
    src = build.root / "models" / "breast-cancer-v2"
    write_skops_model(
        src, build.estimator, [feature_spec(x)], OutputSpec(classes=["malignant", "benign"]), "breast-cancer"
    )
    manifest = json.loads((src / "manifest.json").read_text())
    manifest["version"] = "2"
    (src / "manifest.json").write_text(json.dumps(manifest))
    build.publish(src, reference=x)
    text = config.read_text()
    text = text.replace(
        'path = "bundles/breast-cancer-1"\ntrusted_keys = ["keys/release.pub"]\n',
        'path = "bundles/breast-cancer-1"\ntrusted_keys = ["keys/release.pub"]\n'
        'containment = ["reroute"]\n',
        1,
    )
    rollout = (
        '[[models]]\npath = "bundles/breast-cancer-2"\ntrusted_keys = ["keys/release.pub"]\n'
        'containment = ["reroute"]\n\n'
        '[rollouts.breast-cancer]\nstable = "1"\ncanary = "2"\ncanary_weight = 0.5\n\n'
    )
    roles_at = text.index("[roles.analyst]")
    config.write_text(text[:roles_at] + rollout + text[roles_at:])
    thief, admin = create_key(config, "admin"), create_key(config, "admin")
    server = start_server(config, tmp_path / "server.log")
    try:
        ladder = Ladder(server, tmp_path / "d", thief, admin, x)
        _probe_until_step(ladder, "/v2/models/breast-cancer/infer", 0, "reroute", x)
        row = infer_request(x[:1])

        def versions(key: str) -> set[str]:
            found = set()
            with server.client(key) as client:
                for _ in range(30):
                    answer = client.post("/v2/models/breast-cancer/infer", json=row)
                    assert answer.status_code == 200, answer.text
                    found.add(answer.headers["x-model-version"])
            return found

        assert versions(thief) == {"1"}  # rerouted: never the canary
        # Nor by naming the canary's version (red team of issue 12, second pass, F3: it was served).
        with server.client(thief) as client:
            pinned = client.post("/v2/models/breast-cancer/versions/2/infer", json=row)
        assert pinned.status_code == 200, pinned.text
        assert (pinned.headers["x-model-version"], pinned.json()["model_version"]) == ("1", "1")
        assert versions(admin) == {"1", "2"}  # another key still takes part in the rollout
        with server.client(admin) as operator:
            assert operator.post(f"/v2/admin/keys/{thief.split('_')[1]}/release").status_code == 200
        assert versions(thief) == {"1", "2"}
    finally:
        server.stop()
