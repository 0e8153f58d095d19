"""Two replicas behind one Redis, or one PostgreSQL: a principal's privacy budget and quota are spent
once, across both servers, and a server whose state server is gone refuses (503) instead of
answering unmetered, and says it is not ready. Keys, quarantines, incidents and releases are shared
too (bastion.records): a key revoked by the CLI is refused by the other replica within a second
(measured), a key quarantined by query auditing on one is refused on the other, and an operator's
release on one is served on the other."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from bastion.demo import infer_request
from bastion.tokens import load_or_create_signing_key
from tests.helpers import (
    POSTGRES_DSN,
    REDIS_URL,
    RunningServer,
    create_key,
    drop_postgres_table,
    drop_redis_keys,
    postgres_table,
    redis_prefix,
    run_cli,
    start_server,
    write_test_deployment,
)


@dataclass
class Replicas:
    servers: list[RunningServer]
    keys: dict[str, str]
    features: np.ndarray
    config: Path


@pytest.fixture(scope="module", params=["redis", "postgres"])
def replicas(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    root = tmp_path_factory.mktemp(f"replicas-{request.param}")
    if request.param == "redis":
        namespace = redis_prefix()
        state = f'backend = "redis"\nredis_url = "{REDIS_URL}"\nredis_prefix = "{namespace}"'
    else:
        namespace = postgres_table()
        state = f'backend = "postgres"\npostgres_dsn = "{POSTGRES_DSN}"\npostgres_table = "{namespace}"'
    config, build = write_test_deployment(root)
    text = config.read_text().replace('backend = "sqlite"', state)
    config.write_text(text)
    keys = {role: create_key(config, role) for role in ("dp", "quota")}
    # The second replica: its own state directory and audit log, the keys in the shared backend; the
    # copy gives it the same token signing key (as a replica would get it, mounted from a secret).
    load_or_create_signing_key(root / "state" / "token_signing.jwk")
    shutil.copytree(root / "state", root / "state-2")
    config_2 = root / "bastion-2.toml"
    config_2.write_text(text.replace('state_dir = "state"', 'state_dir = "state-2"'))
    servers = [start_server(config, root / "a.log"), start_server(config_2, root / "b.log")]
    yield Replicas(servers, keys, build.features, config)
    for server in servers:
        server.stop()
    if request.param == "redis":
        drop_redis_keys(namespace)
    else:
        drop_postgres_table(namespace)


def test_privacy_budget_is_spent_once_across_replicas(replicas: Replicas) -> None:
    servers, keys, rows = replicas.servers, replicas.keys, replicas.features
    statuses = []
    for i in range(14):  # epsilon 0.5 a row, budget 5.0: ten answers in all, whichever replica asks
        with servers[i % 2].client(keys["dp"]) as c:
            r = c.post("/v2/models/breast-cancer/infer", json=infer_request(rows[i : i + 1]))
        statuses.append(r.status_code)
        if r.status_code == 429:
            assert r.json()["code"] == "privacy_budget_exhausted"
    assert statuses == [200] * 10 + [429] * 4


def test_replicas_with_their_redis_are_ready(replicas: Replicas) -> None:
    for server in replicas.servers:
        r = httpx.get(f"{server.base_url}/v2/health/ready")
        assert r.status_code == 200 and r.json() == {"ready": True}


def test_daily_quota_is_shared_by_replicas(replicas: Replicas) -> None:
    servers, keys, rows = replicas.servers, replicas.keys, replicas.features
    statuses = []
    for i in range(4):  # daily_quota = 2 for this role
        with servers[i % 2].client(keys["quota"]) as c:
            statuses.append(
                c.post("/v2/models/breast-cancer/infer", json=infer_request(rows[:1])).status_code
            )
    assert statuses == [200, 200, 429, 429]


@pytest.mark.parametrize(
    "state",
    [
        'backend = "redis"\nredis_url = "redis://127.0.0.1:9/0"',
        'backend = "postgres"\npostgres_dsn = "postgresql://postgres@127.0.0.1:9/x"',
    ],
    ids=["redis", "postgres"],
)
def test_a_server_without_its_state_server_refuses_with_503(tmp_path: Path, state: str) -> None:
    config, build = write_test_deployment(tmp_path)
    text = config.read_text().replace('backend = "sqlite"', state)
    config.write_text(text)
    # The keys live in the state server too: the CLI cannot create one, and says so (no traceback).
    created = run_cli("keys", "create", "--config", config, "--name", "k", "--role", "analyst", check=False)
    assert created.returncode == 1 and "shared state" in created.stderr and "Traceback" not in created.stderr
    assert created.stdout == ""
    server = start_server(config, tmp_path / "server.log")
    try:
        # Any key, known or not, is neither accepted nor refused as unknown (401): 503, nothing answered.
        key = "bst_" + "0" * 16 + "_" + "A" * 43
        with server.client(key) as c:
            r = c.post("/v2/models/breast-cancer/infer", json=infer_request(build.features[:1]))
        assert r.status_code == 503 and r.json()["code"] == "state_unavailable"
        # Readiness says so too, so that a load balancer sends the traffic to replicas that can answer.
        ready = httpx.get(f"{server.base_url}/v2/health/ready")
        assert ready.status_code == 503 and ready.json() == {"ready": False}
        assert httpx.get(f"{server.base_url}/v2/health/live").status_code == 200
        assert "Traceback" not in (tmp_path / "server.log").read_text()
    finally:
        server.stop()


METADATA = "/v2/models/breast-cancer"


def _refused_within(server: RunningServer, credential: str, status: int, limit: float = 3.0) -> float:
    """Seconds until `server` answers `credential` with `status` (polled every 20 ms)."""
    start = time.monotonic()
    with server.client(credential) as c:
        while c.get(METADATA).status_code != status:
            assert time.monotonic() - start < limit, f"still not {status} after {limit} s"
            time.sleep(0.02)
    return time.monotonic() - start


def test_a_key_revoked_by_the_cli_is_refused_by_every_replica_within_a_second(replicas: Replicas) -> None:
    a, b = replicas.servers
    key = create_key(replicas.config, "analyst")  # by the CLI, into the shared backend
    for server in (a, b):
        with server.client(key) as c:
            assert c.get(METADATA).status_code == 200  # known to both, and cached by both now
    with a.client(key) as c:
        token = c.post("/v2/auth/token", json={"ttl_seconds": 300}).json()["access_token"]
    with b.client(token) as c:
        assert c.get(METADATA).status_code == 200  # a token minted on A works on B
    run_cli("keys", "revoke", "--config", replicas.config, key.split("_")[1])
    delay = _refused_within(b, key, 401)
    assert delay < 1.0, f"replica B served a revoked key for {delay:.3f} s"
    with a.client(key) as c:
        assert c.get(METADATA).status_code == 401
    with b.client(token) as c:
        assert c.get(METADATA).status_code == 401  # the key's tokens die with it, on every replica


def test_quarantine_incident_and_release_cross_replicas(replicas: Replicas) -> None:
    a, b = replicas.servers
    thief, admin = create_key(replicas.config, "admin"), create_key(replicas.config, "admin")
    thief_id, x = thief.split("_")[1], replicas.features
    with b.client(thief) as c:
        assert c.get(METADATA).status_code == 200  # cached on B before the quarantine
    # Query auditing on A: probes around seed rows until A quarantines the key (403).
    rng = np.random.default_rng(0)
    seeds, spread = x[200:205], x.std(axis=0)
    with a.client(thief) as c:
        for i in range(200):
            row = seeds[i % len(seeds)] + 0.01 * spread * np.sign(rng.standard_normal(x.shape[1]))
            r = c.post("/v2/models/breast-cancer/infer", json=infer_request(row[None].astype(np.float32)))
            if r.status_code == 403:
                break
        else:
            raise AssertionError("replica A never quarantined the thief")
    quarantined_at = time.monotonic()
    with b.client(thief) as c:
        while (r := c.get(METADATA)).status_code != 403:
            assert time.monotonic() - quarantined_at < 1.0, "replica B still serves a quarantined key"
            time.sleep(0.02)
    assert r.json()["code"] == "key_quarantined"
    # The incident A opened is on B's admin API; B's operator releases the key, and A serves it again.
    with b.client(admin) as c:
        incidents = c.get("/v2/admin/incidents").json()["incidents"]
        assert [i["action"] for i in incidents if i["principal"] == f"key:{thief_id}"] == ["quarantine"]
        assert c.post(f"/v2/admin/keys/{thief_id}/release", json={}).status_code == 200
    assert _refused_within(a, thief, 200) < 1.0
