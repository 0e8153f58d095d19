"""The service's own lifecycle, against real state stores."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from bastion.config import load_config
from bastion.service import Bastion
from bastion.state import BudgetKey, SQLiteStateStore, StateStore
from bastion.state.redis import RedisStateStore
from tests.helpers import REDIS_URL, drop_redis_keys, redis_prefix

LIMIT, WINDOW, NOW = 10_000.0, 3600.0, 1000.0


@pytest.fixture(params=["sqlite", "redis"])
def state_config(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Path, str]]:
    section = 'backend = "sqlite"'
    prefix = ""
    if request.param == "redis":
        prefix = redis_prefix()
        section = f'backend = "redis"\nredis_url = "{REDIS_URL}"\nredis_prefix = "{prefix}"'
    config = tmp_path / "bastion.toml"
    config.write_text(f'[server]\nstate_dir = "state"\n\n[state]\n{section}\n')
    yield config, prefix
    if prefix:
        drop_redis_keys(prefix)


def test_shutdown_waits_for_the_block_being_leased_and_returns_everything_unspent(
    state_config: tuple[Path, str], caplog: pytest.LogCaptureFixture
) -> None:
    """Under load a worker leases its next block in the background; stopping at that moment must
    neither lose that block (it would be spent by nobody until the window ends) nor touch a
    closed ledger."""
    config, prefix = state_config

    def reopen() -> StateStore:
        if prefix:
            return RedisStateStore(REDIS_URL, prefix=prefix)
        return SQLiteStateStore(config.parent / "state" / "limits.db")

    async def run() -> float:
        service = Bastion(load_config(config), config_path=config)
        for _ in range(48):  # 48 of a 64-answer block: the next block is being leased now
            spent = await service.state.spend_budget(
                BudgetKey("key:p", "m/epsilon", WINDOW), cost=1.0, limit=LIMIT, now=NOW
            )
            assert spent.allowed
        await service.aclose()
        after = reopen()
        probe = await after.spend_budget(
            BudgetKey("key:p", "m/epsilon", WINDOW), cost=1.0, limit=LIMIT, now=NOW
        )
        await after.aclose()
        return probe.remaining

    with caplog.at_level(logging.WARNING):
        remaining = asyncio.run(run())
    assert remaining == LIMIT - 49
    assert "state store unavailable" not in caplog.text


def test_an_unexpected_error_logs_its_type_and_frames_never_its_message(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A library's exception message can quote the input it choked on; the catch-all of
    `Bastion.handle` answers 500 internal_error and logs no message, whatever the stage."""
    from bastion.context import RequestContext
    from bastion.routes import ROUTE_ACTIONS, Route

    config = tmp_path / "bastion.toml"
    config.write_text('[server]\nstate_dir = "state"\n\n[state]\nbackend = "memory"\n')
    secret_input = "Found unknown categories [31337.4242]"

    class Explodes:
        async def __call__(self, ctx: RequestContext) -> None:
            raise ValueError(secret_input)

    async def run() -> tuple[int, object]:
        service = Bastion(load_config(config), config_path=config)
        service.pipelines[Route.SERVER_METADATA] = [Explodes()]

        async def no_body(limit: int) -> bytes:
            return b""

        ctx = RequestContext(
            request_id="r1",
            action=ROUTE_ACTIONS[Route.SERVER_METADATA],
            now=0.0,
            credentials=None,
            read_body=no_body,
        )
        try:
            outcome = await service.handle(Route.SERVER_METADATA, ctx)
        finally:
            await service.aclose()
        return outcome.status, outcome.body

    with caplog.at_level(logging.DEBUG):
        status, body = asyncio.run(run())
    assert status == 500
    assert body == {"error": "internal error", "code": "internal_error"}
    logged = caplog.text  # as a handler formats it, tracebacks included
    assert "ValueError" in logged
    assert "31337" not in logged
    assert "test_service.py" in logged  # the frames are kept for the operator
