"""Two replicas behind one Redis, or one PostgreSQL: a principal's privacy budget and quota are spent
once, across both servers, and a server whose state server is gone refuses (503) instead of
answering unmetered, and says it is not ready."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from bastion.demo import infer_request
from tests.helpers import (
    POSTGRES_DSN,
    REDIS_URL,
    RunningServer,
    create_key,
    drop_postgres_table,
    drop_redis_keys,
    postgres_table,
    redis_prefix,
    start_server,
    write_test_deployment,
)


@dataclass
class Replicas:
    servers: list[RunningServer]
    keys: dict[str, str]
    features: np.ndarray


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
    # The second replica: its own audit log, the same key database (a copy, as a replica would get).
    shutil.copytree(root / "state", root / "state-2")
    config_2 = root / "bastion-2.toml"
    config_2.write_text(text.replace('state_dir = "state"', 'state_dir = "state-2"'))
    servers = [start_server(config, root / "a.log"), start_server(config_2, root / "b.log")]
    yield Replicas(servers, keys, build.features)
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
    key = create_key(config, "analyst")
    server = start_server(config, tmp_path / "server.log")
    try:
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
