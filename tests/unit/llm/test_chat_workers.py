"""The /v1 pipeline of two workers on one state directory (as `bastion serve --workers 2` runs
them), in process with a scripted model: the prompt-extraction evidence and the leakage guard's
ledger of revealed pieces are shared through the state directory, so a principal alternating
between the workers is contained as on one (bastion.query_history)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from bastion.config import load_config
from bastion.routes import Route
from bastion.service import Bastion, Outcome
from bastion.statedir import StateDirLock, lock_state_dir
from tests.unit.llm.test_chat_core import LLM_POLICY, PROBES, CannedBackend, _chat, _ctx, _demo


def _workers(tmp_path: Path, backend: CannedBackend, count: int = 2) -> tuple[list[Bastion], StateDirLock]:
    """`count` services on one state directory, sharing its lock as the supervisor's workers do."""
    config = _demo(tmp_path)
    config.write_text(config.read_text() + LLM_POLICY.replace("token_budget = 400\n", ""))
    loaded = load_config(config)
    root = tmp_path / "demo" / "state"
    root.mkdir(mode=0o700, exist_ok=True)
    lock = lock_state_dir(root)
    services = [
        Bastion(
            loaded,
            config_path=config,
            chat_backends={"assistant": backend},
            # A copy of the descriptor, as a worker inherits one: the same open file, the same flock.
            state_lock=StateDirLock(root, os.dup(lock.fileno()), owner=False),
        )
        for _ in range(count)
    ]
    return services, lock


def _ask_in_turn(services: list[Bastion], asks: list[str], key_of: int = 0) -> list[Outcome]:
    """Each ask to the next service in turn, with one key (created on the first)."""

    async def go() -> list[Outcome]:
        for s in services:
            await s.startup()
        try:
            key = services[0].keys.create(name="chat", roles=["chatter"], now=time.time()).secret
            outcomes = []
            for i, ask in enumerate(asks):
                s = services[i % len(services)]
                outcomes.append(await s.handle(Route.CHAT, _ctx(Route.CHAT, f"Bearer {key}", _chat(ask))))
            return outcomes
        finally:
            for s in services:
                await s.aclose()

    return asyncio.run(go())


def _first_quarantined(outcomes: list[Outcome]) -> int:
    codes = [o.body.get("code") if o.status != 200 else None for o in outcomes]  # type: ignore[union-attr]
    return codes.index("key_quarantined") + 1


def test_a_prompt_thief_alternating_between_workers_is_quarantined_as_on_one(tmp_path: Path) -> None:
    backend = CannedBackend()
    asks = PROBES * 3
    services, lock = _workers(tmp_path / "one", backend, count=1)
    try:
        alone = _first_quarantined(_ask_in_turn(services, asks))
    finally:
        for s in services:
            s.close()
        lock.release()
    services, lock = _workers(tmp_path / "two", backend)
    assert all(s.histories is not None for s in services)  # the workers' shared store
    try:
        spread = _first_quarantined(_ask_in_turn(services, asks))
    finally:
        for s in services:
            s.close()
        lock.release()
    assert spread == alone


def test_pieces_of_a_secret_over_answers_on_two_workers_add_up(tmp_path: Path) -> None:
    backend = CannedBackend()
    pieces = iter(["The first digits are 734.", "And the last ones: 342."])
    backend.reply = lambda messages: next(pieces)
    services, lock = _workers(tmp_path, backend)
    try:
        first, second = _ask_in_turn(services, ["first digits?", "last digits?"])
    finally:
        for s in services:
            s.close()
        lock.release()
    assert first.status == 200
    # The second answer, on the other worker, would complete the secret with the first's piece.
    assert second.status == 403 and isinstance(second.body, dict)
    assert second.body["code"] == "output_withheld"
