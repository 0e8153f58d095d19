"""The state directory lock: one holder at a time, its PID readable, released on close or death."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bastion.errors import StateDirLocked
from bastion.statedir import holder_pid, lock_state_dir


def test_second_lock_refused_naming_directory_and_pid(tmp_path: Path) -> None:
    lock = lock_state_dir(tmp_path)
    assert holder_pid(tmp_path) == os.getpid()
    with pytest.raises(StateDirLocked) as e:
        lock_state_dir(tmp_path)  # another open file description: refused even in one process
    assert str(tmp_path) in str(e.value) and f"pid {os.getpid()}" in str(e.value)
    assert e.value.pid == os.getpid()
    lock.release()
    lock.release()  # idempotent
    assert holder_pid(tmp_path) is None
    lock_state_dir(tmp_path).release()


def test_a_killed_holder_leaves_the_directory_free(tmp_path: Path) -> None:
    code = (
        "import sys, time; from pathlib import Path; from bastion.statedir import lock_state_dir; "
        f"lock_state_dir(Path({str(tmp_path)!r})); print('locked', flush=True); time.sleep(60)"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "locked"
        assert holder_pid(tmp_path) == child.pid
        with pytest.raises(StateDirLocked, match=f"pid {child.pid}"):
            lock_state_dir(tmp_path)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    lock_state_dir(tmp_path).release()  # the kernel dropped the lock with the process
