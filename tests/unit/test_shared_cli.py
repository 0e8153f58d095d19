"""The operator's commands against the shared backend the policy file names (Redis, PostgreSQL): what
`bastion keys|incidents|models|rollout` change is what every replica reads, and nothing lands in
the local state directory."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bastion.cli import main
from bastion.config import load_config
from bastion.incidents import IncidentState
from bastion.records import CHECK_EVERY, RecordStores, open_records
from bastion.rollout import RolloutState
from bastion.statedir import StatePaths
from tests.helpers import (
    POSTGRES_DSN,
    REDIS_URL,
    drop_postgres_table,
    drop_redis_keys,
    postgres_table,
    redis_prefix,
)

CONFIG = """
[server]
state_dir = "state"

[state]
{state}

[roles.analyst]
grants = [ {{ models = ["*"], actions = ["infer"] }} ]
"""


@pytest.fixture(params=["redis", "postgres"])
def config(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "bastion.toml"
    if request.param == "redis":
        prefix = redis_prefix()
        state = f'backend = "redis"\nredis_url = "{REDIS_URL}"\nredis_prefix = "{prefix}"'
        cleanup: Callable[[], None] = lambda: drop_redis_keys(prefix)  # noqa: E731
    else:
        table = postgres_table()
        state = f'backend = "postgres"\npostgres_dsn = "{POSTGRES_DSN}"\npostgres_table = "{table}"'
        cleanup = lambda: drop_postgres_table(table)  # noqa: E731
    path.write_text(CONFIG.format(state=state))
    yield path
    cleanup()


@pytest.fixture
def replica(config: Path) -> Iterator[RecordStores]:
    """What a server of this policy file reads (another process than the CLI's)."""
    stores = open_records(load_config(config), StatePaths(config.parent / "state"))
    yield stores
    stores.close()


@pytest.fixture
def cli(capfd: pytest.CaptureFixture[str]) -> Callable[..., subprocess.CompletedProcess[str]]:
    def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
        capfd.readouterr()
        code = main([str(a) for a in args])
        out, err = capfd.readouterr()
        return subprocess.CompletedProcess(list(args), code, out, err)

    return run


def test_keys_created_listed_released_and_revoked_in_the_backend(
    config: Path, replica: RecordStores, cli: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    created = cli("keys", "create", "--config", config, "--name", "ci", "--role", "analyst")
    assert created.returncode == 0
    key = created.stdout.strip()
    key_id = key.split("_")[1]
    assert replica.keys.authenticate(key, now=time.time()).name == "ci"
    assert not (config.parent / "state" / "keys.db").exists()  # nothing local
    assert key_id in cli("keys", "list", "--config", config).stdout
    replica.keys.quarantine(key_id, now=time.time())
    replica.measures.apply(f"key:{key_id}", "m", "throttle", value="1", now=time.time(), until=time.time() + 60)
    assert cli("keys", "release", "--config", config, key_id).returncode == 0
    assert replica.keys.get(key_id).quarantined_at is None  # type: ignore[union-attr]
    assert not replica.measures.list(now=time.time())
    assert cli("keys", "revoke", "--config", config, key_id).returncode == 0
    assert cli("keys", "revoke", "--config", config, key_id).returncode == 1  # once
    time.sleep(CHECK_EVERY)  # the replica's cache of the key lives that long at most
    assert replica.keys.get(key_id).revoked_at is not None  # type: ignore[union-attr]


def test_incidents_models_and_rollouts_from_the_cli(
    config: Path, replica: RecordStores, cli: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    opened = replica.incidents.open(
        kind="extraction_suspected",
        model="m",
        principal="key:0123456789abcdef",
        action="quarantine",
        detail="d",
        evidence={},
        request_id=None,
        now=time.time(),
    )
    assert "extraction_suspected" in cli("incidents", "list", "--config", config).stdout
    assert cli("incidents", "ack", "--config", config, str(opened), "--note", "on it").returncode == 0
    assert replica.incidents.get(opened).state == IncidentState.INVESTIGATING
    replica.isolation.isolate("m", now=time.time(), reason="several principals")
    assert cli("models", "release", "--config", config, "m").returncode == 0
    assert not replica.isolation.list()
    assert cli("models", "release", "--config", config, "m").returncode == 1
    replica.rollouts.save({"m": RolloutState("1", "2", 0.2, "canary")})
    assert cli("rollout", "rollback", "m", "--config", config).returncode == 0
    assert replica.rollouts.load()["m"].status == "rolled_back"
