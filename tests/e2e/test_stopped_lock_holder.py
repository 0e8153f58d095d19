"""A process stopped (SIGSTOP: a hung sibling worker) while it holds a shared SQLite write lock of the
state directory, from the attacker's side with real processes: the server on the same directory
answers 503 within the bound (LOCK_WAIT_SECONDS + 1 s), never hangs, its liveness stays fast, and
once the holder resumes or dies everything is served again and the audit chain verifies.

The holder is a real process that takes the lock the way a worker does (the audit flock and
BEGIN IMMEDIATE; BEGIN IMMEDIATE on a store's file), then is stopped."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bastion.demo import infer_request
from bastion.errors import StateUnavailable
from bastion.query_history import SQLiteHistoryStore
from bastion.sqlite_wait import LOCK_WAIT_SECONDS
from bastion.state.leased import QUOTA
from bastion.state.sqlite import SQLiteLedger
from tests.helpers import RunningServer, create_key, run_cli, start_server, write_test_deployment

pytestmark = pytest.mark.slow

_HOLDER = r"""
import fcntl, os, sqlite3, sys
db = sys.argv[1]
if db.endswith("audit.db"):
    fd = os.open(db + ".lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
conn = sqlite3.connect(db, isolation_level=None, timeout=30)
conn.execute("BEGIN IMMEDIATE")
print("held", flush=True)
sys.stdin.readline()  # "go": let it go (after SIGCONT)
conn.execute("COMMIT")
"""


def _hold(db: Path) -> subprocess.Popen[str]:
    """A process holding `db`'s write lock, stopped."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(db)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    os.kill(holder.pid, signal.SIGSTOP)
    return holder


def _release(holder: subprocess.Popen[str], *, kill: bool) -> None:
    if kill:  # it dies: the kernel drops its flock and SQLite's locks
        holder.kill()
    else:  # it resumes and lets the lock go
        os.kill(holder.pid, signal.SIGCONT)
        assert holder.stdin is not None
        holder.stdin.write("go\n")
        holder.stdin.flush()
    holder.wait(timeout=10)


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[RunningServer, str, Path, list[float]]]:
    root = tmp_path_factory.mktemp("stopped_holder")
    config, build = write_test_deployment(root)
    key = create_key(config, "analyst")
    server = start_server(config, root / "server.log")
    (audit_db,) = root.rglob("audit.db")
    yield server, key, audit_db, [float(x) for x in build.features[0]]
    server.stop()


@pytest.mark.parametrize("kill", [False, True], ids=["resumed", "killed"])
def test_audit_lock_held_by_a_stopped_process(
    served: tuple[RunningServer, str, Path, list[float]], kill: bool
) -> None:
    server, key, audit_db, row = served
    import numpy as np

    body = infer_request(np.array([row]))
    headers = {"Authorization": f"Bearer {key}"}
    url = f"{server.base_url}/v2/models/breast-cancer/infer"
    with httpx.Client(timeout=10) as c:
        assert c.post(url, json=body, headers=headers).status_code == 200
        holder = _hold(audit_db)
        try:
            for _ in range(3):  # the first waits out the bound, the next are refused at once
                t = time.monotonic()
                r = c.post(url, json=body, headers=headers)
                took = time.monotonic() - t
                assert r.status_code == 503, r.text
                assert r.json()["code"] == "audit_unavailable"
                assert took < LOCK_WAIT_SECONDS + 1.0
                t = time.monotonic()
                assert c.get(f"{server.base_url}/v2/health/live").status_code == 200
                assert time.monotonic() - t < 0.5
        finally:
            _release(holder, kill=kill)
        deadline = time.monotonic() + 5
        while (status := c.post(url, json=body, headers=headers).status_code) != 200:
            assert time.monotonic() < deadline, status
            time.sleep(0.1)
    if kill:  # the last test: stop the server, the chain verifies
        server.stop()
        result = run_cli("audit", "verify", "--config", server.config, check=False)
        assert result.returncode == 0, result.stdout + result.stderr


async def _measure(call: object) -> tuple[BaseException | None, float, float]:
    """Run `call` (a coroutine) with a 10 ms ticker beside it: the error it raised, how long it took,
    and the longest gap between ticks (how long the event loop was blocked)."""
    gaps: list[float] = []
    stop = asyncio.Event()

    async def tick() -> None:
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    t = time.monotonic()
    error: BaseException | None = None
    try:
        await call  # type: ignore[misc]
    except BaseException as e:
        error = e
    took = time.monotonic() - t
    stop.set()
    await ticker
    return error, took, max(gaps, default=0.0)


def test_histories_lock_held_by_a_stopped_process(tmp_path: Path) -> None:
    db = tmp_path / "histories.db"
    store = SQLiteHistoryStore(db)
    holder = _hold(db)

    async def run() -> tuple[BaseException | None, float, float]:
        return await _measure(store.update("k", lambda old: b"x"))

    try:
        error, took, gap = asyncio.run(run())
        assert isinstance(error, StateUnavailable)
        assert LOCK_WAIT_SECONDS - 0.1 < took < LOCK_WAIT_SECONDS + 1.0
        assert gap < 0.2  # the loop went on while it waited
    finally:
        _release(holder, kill=False)
    error, _, _ = asyncio.run(run())
    assert error is None
    asyncio.run(store.aclose())


def test_limits_lock_held_by_a_stopped_process(tmp_path: Path) -> None:
    db = tmp_path / "limits.db"
    ledger = SQLiteLedger(db)
    holder = _hold(db)

    async def run() -> tuple[BaseException | None, float, float]:
        return await _measure(ledger.take(QUOTA, "p", 1, limit=10, need=1, cap=5, ttl=60))

    try:
        error, took, gap = asyncio.run(run())
        assert isinstance(error, StateUnavailable)
        assert LOCK_WAIT_SECONDS - 0.1 < took < LOCK_WAIT_SECONDS + 1.0
        assert gap < 0.2
    finally:
        _release(holder, kill=True)
    error, _, _ = asyncio.run(run())
    assert error is None
    ledger.close()
