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
from tests.helpers import REDIS_URL, drop_redis_keys, free_port, redis_prefix

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


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        ("[limits]\nmax_body_bytes = 4096\n", "limits.max_body_bytes"),
        ("[server]\nstate_dir = \"state\"\nmax_connections = 64\n", "server.max_connections"),
        ("[grpc]\nenabled = true\n", "grpc.enabled"),
        ("[tokens]\nttl_seconds = 60\n", "tokens.ttl_seconds"),
        ("[metrics]\nenabled = false\n", "metrics.enabled"),
    ],
)
def test_a_reload_changing_a_restart_only_setting_is_refused_naming_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, edit: str, named: str
) -> None:
    # A reload used to take such a change without applying it (the front end kept its body cap, the
    # gRPC server its options): accepted and not enforced. Now the previous configuration serves on.
    config = tmp_path / "bastion.toml"
    base = '[server]\nstate_dir = "state"\n\n[roles.a]\nrate = 1\n'
    config.write_text(base)

    async def run() -> tuple[Bastion, object, object]:
        service = Bastion(load_config(config), config_path=config)
        before = service.config
        text = base.replace('[server]\nstate_dir = "state"\n', "") if edit.startswith("[server]") else base
        config.write_text(edit + "\n" + text.replace("rate = 1", "rate = 2"))
        await service.reload()
        after = service.config
        await service.aclose()
        return service, before, after

    with caplog.at_level(logging.ERROR, logger="bastion"):
        _, before, after = asyncio.run(run())
    assert after is before  # neither the restart-only change nor the role's new rate
    assert f"{named}: changed; these take effect on restart only" in caplog.text


def test_a_reload_of_roles_and_request_limits_applies(tmp_path: Path) -> None:
    config = tmp_path / "bastion.toml"
    config.write_text('[server]\nstate_dir = "state"\n\n[limits]\nmax_rows = 10\n\n[roles.a]\nrate = 1\n')

    async def run() -> Bastion:
        service = Bastion(load_config(config), config_path=config)
        config.write_text('[server]\nstate_dir = "state"\n\n[limits]\nmax_rows = 5\n\n[roles.a]\nrate = 2\n')
        await service.reload()
        await service.aclose()
        return service

    service = asyncio.run(run())
    assert service.config.limits.max_rows == 5 and service.config.roles["a"].rate == 2


def test_grpc_answers_that_could_exceed_its_send_limit_are_refused_at_start_and_on_reload(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # grpc fails an answer over max_send_message_bytes after the pipeline charged budgets and audited it
    # as sent: max_rows rows of the widest model's answer must fit, or the server does not start.
    from bastion.demo import build_demo
    from bastion.errors import ConfigError

    build_demo(tmp_path / "demo", llm=False, grpc_port=free_port())
    config = tmp_path / "demo" / "bastion.toml"
    text = config.read_text()
    assert "max_rows = 256" in text
    fitting = Bastion(load_config(config), config_path=config)  # the demo's own settings fit
    config.write_text(text.replace("max_rows = 256", "max_rows = 100000"))

    async def reload() -> int:
        await fitting.reload()  # max_rows reloads; this value does not fit
        await fitting.aclose()
        return fitting.config.limits.max_rows

    with caplog.at_level(logging.ERROR, logger="bastion"):
        assert asyncio.run(reload()) == 256
    assert "reload refused" in caplog.text and "grpc.max_send_message_bytes" in caplog.text
    refused = r"grpc\.max_send_message_bytes: 4194304 bytes, but limits\.max_rows = 100000"
    with pytest.raises(ConfigError, match=refused):
        Bastion(load_config(config), config_path=config)
