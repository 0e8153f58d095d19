"""Two replicas on one Redis, or one PostgreSQL: a thief whose probes alternate between them is
quarantined after exactly as many requests as a thief sending the same probes to one of them
(query auditing's histories live in the shared backend, bastion.query_history)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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
    start_server,
    write_test_deployment,
)

pytestmark = pytest.mark.slow


@dataclass
class Pair:
    servers: list[RunningServer]
    config: Path
    features: np.ndarray


@pytest.fixture(scope="module", params=["redis", "postgres"])
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    root = tmp_path_factory.mktemp(f"history-{request.param}")
    if request.param == "redis":
        namespace = redis_prefix()
        state = f'backend = "redis"\nredis_url = "{REDIS_URL}"\nredis_prefix = "{namespace}"'
    else:
        namespace = postgres_table()
        state = f'backend = "postgres"\npostgres_dsn = "{POSTGRES_DSN}"\npostgres_table = "{namespace}"'
    config, build = write_test_deployment(root)
    text = config.read_text().replace('backend = "sqlite"', state)
    config.write_text(text)
    load_or_create_signing_key(root / "state" / "token_signing.jwk")
    shutil.copytree(root / "state", root / "state-2")
    config_2 = root / "bastion-2.toml"
    config_2.write_text(text.replace('state_dir = "state"', 'state_dir = "state-2"'))
    servers = [start_server(config, root / "a.log"), start_server(config_2, root / "b.log")]
    yield Pair(servers, config, build.features)
    for server in servers:
        server.stop()
    if request.param == "redis":
        drop_redis_keys(namespace)
    else:
        for suffix in ("", "_history", "_records", "_records_counters"):
            drop_postgres_table(namespace + suffix)


def _probe_until_quarantined(servers: list[RunningServer], key: str, x: np.ndarray) -> int:
    """Jacobian-style probing around five seeds, request i to servers[i % len(servers)]."""
    rng = np.random.default_rng(0)
    seeds, spread = x[200:205], x.std(axis=0)
    clients = [server.client(key) for server in servers]
    try:
        for i in range(100):
            row = seeds[i % len(seeds)] + 0.01 * spread * np.sign(rng.standard_normal(x.shape[1]))
            response = clients[i % len(clients)].post(
                "/v2/models/breast-cancer/infer", json=infer_request(row[None].astype(np.float32))
            )
            if response.status_code == 403:
                assert response.json()["code"] == "key_quarantined"
                return i + 1
            assert response.status_code == 200, response.text
    finally:
        for client in clients:
            client.close()
    raise AssertionError("never quarantined")


def test_a_thief_spread_over_replicas_is_quarantined_as_soon_as_on_one(pair: Pair) -> None:
    alone = _probe_until_quarantined(pair.servers[:1], create_key(pair.config, "admin"), pair.features)
    spread = _probe_until_quarantined(pair.servers, create_key(pair.config, "admin"), pair.features)
    assert alone <= 40
    assert spread == alone
