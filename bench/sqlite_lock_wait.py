"""The bounded lock waits (bastion.sqlite_wait, the AuditLog's LOCK_WAIT_SECONDS) cost nothing when
the lock is free: the current code against the code before them (`git show BASE:<path>`, loaded as
separate modules), side by side in one process, rounds alternating, one process (uncontended).
Rates are operations per CPU second of this process (time.process_time: steadier than wall time on
a shared machine); medians over the rounds.

- audit: an AuditLog over a SQLiteSink (fsync off: CPU, not the disk), --concurrency tasks submitting
  wait=True records; records/s.
- histories: SQLiteHistoryStore.update on one key (a write each time); updates/s.
- limits: SQLiteLedger.take (one write each); takes/s.

    .venv/bin/python bench/sqlite_lock_wait.py [--base 101df2c~1] [--after 101df2c] [--seconds 1] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

import bastion.audit.log as new_log  # noqa: E402
import bastion.query_history as new_hist  # noqa: E402
import bastion.state.sqlite as new_state  # noqa: E402
from bastion.audit.sink import SQLiteSink  # noqa: E402
from bastion.state.leased import QUOTA  # noqa: E402


def old_module(base: str, path: str, name: str, tmp: Path) -> ModuleType:
    text = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{base}:{path}"], check=True, capture_output=True, text=True
    ).stdout
    file = tmp / f"{name}.py"
    file.write_text(text)
    spec = importlib.util.spec_from_file_location(name, file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


async def audit_rate(mod: ModuleType, tmp: Path, seconds: float, concurrency: int) -> float:
    sink = SQLiteSink(tmp / f"a{time.monotonic_ns()}.db", Ed25519PrivateKey.generate(), fsync=False)
    audit = mod.AuditLog(sink)
    done = 0
    end = time.monotonic() + seconds

    async def writer() -> None:
        nonlocal done
        while time.monotonic() < end:
            await audit.submit({"event": "request", "pad": "x" * 400}, wait=True)
            done += 1

    cpu = time.process_time()
    await asyncio.gather(*(writer() for _ in range(concurrency)))
    cpu = time.process_time() - cpu
    audit.close()
    return done / cpu


async def hist_rate(mod: ModuleType, tmp: Path, seconds: float) -> float:
    store = mod.SQLiteHistoryStore(tmp / f"h{time.monotonic_ns()}.db")
    n = 0
    end = time.monotonic() + seconds
    cpu = time.process_time()
    while time.monotonic() < end:
        await store.update("k", lambda old, n=n: n.to_bytes(8, "big"))
        n += 1
    cpu = time.process_time() - cpu
    await store.aclose()
    return n / cpu


async def ledger_rate(mod: ModuleType, tmp: Path, seconds: float) -> float:
    ledger = mod.SQLiteLedger(tmp / f"l{time.monotonic_ns()}.db")
    n = 0
    end = time.monotonic() + seconds
    cpu = time.process_time()
    while time.monotonic() < end:
        await ledger.take(QUOTA, "p", 1, limit=1e12, need=1, cap=1, ttl=60)
        n += 1
    cpu = time.process_time() - cpu
    ledger.close()
    return n / cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", default="101df2c~1")
    parser.add_argument("--after", default="", help="a commit (default: the working tree)")
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        old = {
            "audit": old_module(args.base, "src/bastion/audit/log.py", "old_log", tmp),
            "histories": old_module(args.base, "src/bastion/query_history.py", "old_hist", tmp),
            "limits": old_module(args.base, "src/bastion/state/sqlite.py", "old_state", tmp),
        }
        new: dict[str, ModuleType] = {"audit": new_log, "histories": new_hist, "limits": new_state}
        if args.after:
            new = {
                "audit": old_module(args.after, "src/bastion/audit/log.py", "new_log", tmp),
                "histories": old_module(args.after, "src/bastion/query_history.py", "new_hist", tmp),
                "limits": old_module(args.after, "src/bastion/state/sqlite.py", "new_state", tmp),
            }
        results: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.rounds):
            for which, mods in (("before", old), ("after", new)):
                rates: dict[str, Any] = {
                    "audit": asyncio.run(audit_rate(mods["audit"], tmp, args.seconds, args.concurrency)),
                    "histories": asyncio.run(hist_rate(mods["histories"], tmp, args.seconds)),
                    "limits": asyncio.run(ledger_rate(mods["limits"], tmp, args.seconds)),
                }
                for k, v in rates.items():
                    results.setdefault((k, which), []).append(v)
        for store in ("audit", "histories", "limits"):
            b, a = (statistics.median(results[(store, w)]) for w in ("before", "after"))
            print(f"{store:10s} before {b:9.0f}/CPU-s  after {a:9.0f}/CPU-s  ({(a - b) / b * 100:+.1f}%)")


if __name__ == "__main__":
    main()
