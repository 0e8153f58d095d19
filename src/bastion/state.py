"""Rate-limit and quota state behind a narrow, atomic interface.

`StateStore.acquire` checks the token bucket and the daily quota and consumes
both in one step, or neither: two workers can never both take the last unit.
The arithmetic lives in `admit`, shared by every backend; a backend only has to
read and write the two numbers atomically (a Redis backend will do it in one
Lua script).
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

DAY = 86_400.0


@dataclass(frozen=True, slots=True)
class LimitSpec:
    rate: float  # tokens per second
    burst: int  # bucket size
    daily_quota: int  # requests per UTC day


@dataclass(frozen=True, slots=True)
class Admission:
    allowed: bool
    reason: str | None = None  # "rate_limited" | "quota_exhausted"
    retry_after: float = 0.0
    quota_remaining: int = 0


@dataclass(slots=True)
class _Usage:
    tokens: float
    updated: float
    day: int
    used: int


def admit(usage: _Usage | None, spec: LimitSpec, *, now: float, cost: int) -> tuple[Admission, _Usage]:
    """Pure decision: given the stored usage, admit or refuse, and the usage to store."""
    today = int(now // DAY)
    if usage is None:
        usage = _Usage(tokens=float(spec.burst), updated=now, day=today, used=0)
    tokens = min(float(spec.burst), usage.tokens + max(0.0, now - usage.updated) * spec.rate)
    used = usage.used if usage.day == today else 0
    if used + cost > spec.daily_quota:
        retry = (today + 1) * DAY - now
        return Admission(False, "quota_exhausted", retry, 0), _Usage(tokens, now, today, used)
    if tokens < cost:
        retry = (cost - tokens) / spec.rate
        return Admission(False, "rate_limited", retry, spec.daily_quota - used), _Usage(
            tokens, now, today, used
        )
    new = _Usage(tokens - cost, now, today, used + cost)
    return Admission(True, None, 0.0, spec.daily_quota - new.used), new


class StateStore(Protocol):
    async def acquire(self, principal: str, spec: LimitSpec, *, now: float, cost: int = 1) -> Admission: ...

    def close(self) -> None: ...


class MemoryStateStore:
    """In-process state: fastest, lost on restart, per worker."""

    def __init__(self) -> None:
        self._usage: dict[str, _Usage] = {}
        self._lock = threading.Lock()

    async def acquire(self, principal: str, spec: LimitSpec, *, now: float, cost: int = 1) -> Admission:
        with self._lock:
            admission, usage = admit(self._usage.get(principal), spec, now=now, cost=cost)
            self._usage[principal] = usage
        return admission

    def close(self) -> None:
        self._usage.clear()


class SQLiteStateStore:
    """State in a SQLite file (WAL): quotas survive a restart and are exact across workers on one host.

    Optimistic concurrency: read the row, decide in Python (`admit`), then write it
    back only if its version has not moved (compare-and-swap); a lost race retries.
    Two statements per request instead of a four-statement locked transaction.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL: a commit survives a process crash without an fsync per request.
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA busy_timeout=5000")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS usage (principal TEXT PRIMARY KEY, tokens REAL NOT NULL, "
            "updated REAL NOT NULL, day INTEGER NOT NULL, used INTEGER NOT NULL, version INTEGER NOT NULL)"
        )
        self._lock = threading.Lock()

    async def acquire(self, principal: str, spec: LimitSpec, *, now: float, cost: int = 1) -> Admission:
        with self._lock:
            while True:
                row = self._conn.execute(
                    "SELECT tokens, updated, day, used, version FROM usage WHERE principal = ?", (principal,)
                ).fetchone()
                admission, usage = admit(None if row is None else _Usage(*row[:4]), spec, now=now, cost=cost)
                values = (usage.tokens, usage.updated, usage.day, usage.used)
                if row is None:
                    cur = self._conn.execute(
                        "INSERT OR IGNORE INTO usage VALUES (?, ?, ?, ?, ?, 1)", (principal, *values)
                    )
                else:
                    cur = self._conn.execute(
                        "UPDATE usage SET tokens = ?, updated = ?, day = ?, used = ?, version = version + 1 "
                        "WHERE principal = ? AND version = ?",
                        (*values, principal, row[4]),
                    )
                if cur.rowcount == 1:
                    return admission
                # Another worker wrote first: read again and decide again.

    def close(self) -> None:
        self._conn.close()
