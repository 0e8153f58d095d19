"""A hung worker, from the attacker's side, with real processes: `bastion serve --workers 2` where
one worker is stopped (SIGSTOP: its process alive, its listening socket still taking connections
from the kernel) or only its event loop's thread is stopped (ptrace: the other threads run on).
The supervisor must notice the missing heartbeat, kill it and start a new one, after which every
new connection is answered again (red team finding F3, bench/redteam_scale2)."""

from __future__ import annotations

import ctypes
import os
import re
import signal
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from bastion.demo import infer_request
from tests.e2e.test_workers import children, wait_for_workers
from tests.helpers import RunningServer, create_key, start_server, write_test_deployment

pytestmark = pytest.mark.slow

TIMEOUT = 3.0  # server.worker_heartbeat_timeout_seconds in this test's policy file


@dataclass
class Deployment:
    server: RunningServer
    config: Path
    log: Path
    port: int
    key: str
    admin: str
    features: np.ndarray


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("heartbeat")
    config, build = write_test_deployment(root)
    text = config.read_text()
    assert text.count("[server]\n") == 1
    config.write_text(text.replace("[server]\n", f"[server]\nworker_heartbeat_timeout_seconds = {TIMEOUT}\n"))
    key, admin = create_key(config, "analyst"), create_key(config, "admin")
    server = start_server(config, root / "server.log", "--workers", "2")
    port = int(server.base_url.rsplit(":", 1)[1])
    wait_for_workers(server, port, 2)
    yield Deployment(server, config, root / "server.log", port, key, admin, build.features)
    server.stop()


def _infer(dep: Deployment, i: int) -> int | str:
    # A new connection per request: the kernel hashes each one to a worker's own accept queue.
    body = infer_request(dep.features[i % len(dep.features)][None, :])
    try:
        r = httpx.post(
            f"{dep.server.base_url}/v2/models/breast-cancer/infer",
            json=body,
            headers={"Authorization": f"Bearer {dep.key}"},
            timeout=5,
        )
    except httpx.TransportError as e:
        return type(e).__name__
    return r.status_code


def _live(dep: Deployment) -> int | str:
    try:
        return httpx.get(f"{dep.server.base_url}/v2/health/live", timeout=5).status_code
    except httpx.TransportError as e:
        return type(e).__name__


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True


def _kills(dep: Deployment) -> float:
    text = httpx.get(
        f"{dep.server.base_url}/metrics", headers={"Authorization": f"Bearer {dep.admin}"}, timeout=10
    ).text
    found = re.search(r"^bastion_worker_heartbeat_kills_total (\S+)$", text, re.M)
    assert found, "the supervisor's counter is missing from /metrics"
    return float(found.group(1))


def _all_answered(dep: Deployment) -> None:
    with ThreadPoolExecutor(5) as pool:
        infers = Counter(pool.map(lambda i: _infer(dep, i), range(20)))
        lives = Counter(pool.map(lambda _: _live(dep), range(20)))
    assert infers == Counter({200: 20}), infers
    assert lives == Counter({200: 20}), lives


def _wait_replaced(dep: Deployment, victim: int, other: int, stopped_at: float) -> list[int]:
    deadline = stopped_at + TIMEOUT + 5  # the supervisor's 0.1 s tick, on a busy 2-core machine
    while not _gone(victim) and time.monotonic() < deadline:
        time.sleep(0.1)
    killed_after = time.monotonic() - stopped_at
    assert _gone(victim), f"hung worker {victim} still alive {killed_after:.1f} s after it stopped"
    assert killed_after >= TIMEOUT - 0.5  # not before its heartbeat was overdue
    after = wait_for_workers(dep.server, dep.port, 2, timeout=60, gone=victim)
    assert victim not in after and other in after, (victim, other, after)
    return after


def test_a_stopped_worker_is_killed_and_replaced(deployment: Deployment) -> None:
    dep = deployment
    victim, other = wait_for_workers(dep.server, dep.port, 2)
    _all_answered(dep)
    kills_before = _kills(dep)
    os.kill(victim, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        _wait_replaced(dep, victim, other, stopped_at)
    finally:
        if not _gone(victim):
            os.kill(victim, signal.SIGKILL)
    _all_answered(dep)
    assert _kills(dep) == kills_before + 1
    log = dep.log.read_text()
    assert re.search(rf"worker \d \(pid {victim}\) sent no heartbeat for [\d.]+ s \(hung\): killed", log)
    assert dep.key not in log and dep.admin not in log


# ptrace(2): stop one thread (the worker's main thread, where its event loop runs), not the process.
_PTRACE_DETACH, _PTRACE_SEIZE, _PTRACE_INTERRUPT = 17, 0x4206, 0x4207
_WALL = 0x40000000


def test_a_worker_whose_event_loop_is_blocked_is_killed(deployment: Deployment) -> None:
    """Only the event loop's thread is stopped; the process and its other threads (audit writer,
    thread pools) run on, so a process-level liveness check would pass."""
    dep = deployment
    victim, other = wait_for_workers(dep.server, dep.port, 2)
    threads = len(list(Path(f"/proc/{victim}/task").iterdir()))
    assert threads > 1  # the worker has other threads that keep running
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    if libc.ptrace(_PTRACE_SEIZE, victim, None, None) != 0:
        pytest.skip(f"ptrace not permitted here (errno {ctypes.get_errno()})")
    kills_before = _kills(dep)
    assert libc.ptrace(_PTRACE_INTERRUPT, victim, None, None) == 0
    stopped_at = time.monotonic()
    status = ctypes.c_int()
    assert libc.waitpid(victim, ctypes.byref(status), _WALL) == victim  # the main thread is stopped
    # Another thread of the worker is still running (not in state T).
    states = {
        t.name: (t / "stat").read_text().split(") ")[1].split()[0]
        for t in Path(f"/proc/{victim}/task").iterdir()
    }
    assert states[str(victim)] in ("t", "T"), states
    assert any(s not in ("t", "T") for tid, s in states.items() if tid != str(victim)), states
    deadline = stopped_at + TIMEOUT + 5
    # A traced thread's death is reported to its tracer first: reap it so the supervisor sees it.
    while time.monotonic() < deadline:
        reaped = libc.waitpid(victim, ctypes.byref(status), _WALL | os.WNOHANG) == victim
        if reaped and (os.WIFSIGNALED(status.value) or os.WIFEXITED(status.value)):
            break
        time.sleep(0.1)
    else:
        libc.ptrace(_PTRACE_DETACH, victim, None, None)
        os.kill(victim, signal.SIGKILL)
        raise AssertionError(f"worker {victim} with a stopped event loop not killed within {TIMEOUT + 5} s")
    assert os.WIFSIGNALED(status.value) and os.WTERMSIG(status.value) == signal.SIGKILL
    after = wait_for_workers(dep.server, dep.port, 2, timeout=60, gone=victim)
    assert victim not in after and other in after
    _all_answered(dep)
    assert _kills(dep) == kills_before + 1
    assert victim not in children(dep.server.process.pid)
