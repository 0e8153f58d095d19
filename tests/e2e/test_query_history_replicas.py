"""Two replicas on one Redis, or one PostgreSQL: a thief whose probes alternate between them is
quarantined after exactly as many requests as a thief sending the same probes to one of them
(query auditing's histories live in the shared backend, bastion.query_history)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from bastion.demo import infer_request
from tests.helpers import (
    RunningServer,
    create_key,
    two_replicas,
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
    with two_replicas(root, request.param) as (servers, config, build, _):
        yield Pair(servers, config, build.features)


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
