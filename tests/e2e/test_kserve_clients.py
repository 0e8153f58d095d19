"""The KServe SDK's clients, run in a process of their own.

`kserve` and `tritonclient.grpc` both register the V2 messages (`inference.ServerLiveRequest`, ...)
in protobuf's default descriptor pool, so one process cannot import both (TypeError: duplicate
symbol). The tritonclient tests run in this process; the KServe SDK's suite
(`kserve_clients_suite.py`) runs in a child pytest, and every one of its tests must pass.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SUITE = Path(__file__).with_name("kserve_clients_suite.py")
ROOT = Path(__file__).resolve().parents[2]


def test_the_kserve_sdk_suite_passes_in_its_own_process() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", str(SUITE)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and " failed" not in done.stdout and "skipped" not in done.stdout
    assert sum(line.startswith("PASSED ") for line in done.stdout.splitlines()) >= 15
