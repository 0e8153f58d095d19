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


@dataclass(frozen=True, slots=True)
class BudgetSpend:
    allowed: bool
    remaining: float  # what is left in this window after this request
    retry_after: float  # seconds until the window renews (when refused)


def spend(
    spent: float, window: int, *, cost: float, limit: float, now: float, window_seconds: float
) -> tuple[BudgetSpend, float, int]:
    """Pure decision for a privacy budget: (decision, spent to store, window to store)."""
    current = int(now // window_seconds)
    used = spent if window == current else 0.0
    if used + cost > limit + 1e-12:  # float sums of epsilons: tolerate rounding, never a whole answer
        return BudgetSpend(False, max(0.0, limit - used), (current + 1) * window_seconds - now), used, current
    return BudgetSpend(True, limit - used - cost, 0.0), used + cost, current


class StateStore(Protocol):
    async def acquire(self, principal: str, spec: LimitSpec, *, now: float, cost: int = 1) -> Admission: ...

    async def spend_budget(
        self, principal: str, *, cost: float, limit: float, now: float, window_seconds: float
    ) -> BudgetSpend:
        """Privacy filter: spend `cost` of `limit` in the current window, exactly and atomically, or refuse."""
        ...

    def close(self) -> None: ...


class MemoryStateStore:
    """In-process state: fastest, lost on restart, per worker."""

    def __init__(self) -> None:
        self._usage: dict[str, _Usage] = {}
        self._budgets: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    async def spend_budget(
        self, principal: str, *, cost: float, limit: float, now: float, window_seconds: float
    ) -> BudgetSpend:
        with self._lock:
            spent, window = self._budgets.get(principal, (0.0, -1))
            decision, spent, window = spend(
                spent, window, cost=cost, limit=limit, now=now, window_seconds=window_seconds
            )
            self._budgets[principal] = (spent, window)
        return decision

    async def acquire(self, principal: str, spec: LimitSpec, *, now: float, cost: int = 1) -> Admission:
        with self._lock:
            admission, usage = admit(self._usage.get(principal), spec, now=now, cost=cost)
            self._usage[principal] = usage
        return admission

    def close(self) -> None:
        self._usage.clear()


_LEASE_MAX = 64


@dataclass(slots=True)
class _Lease:
    day: int
    granted: int  # quota units this process has taken from the database for `day`
    pool_left: int  # what the database had left after the last lease


class SQLiteStateStore:
    """Quotas in a SQLite file (WAL) that survive a restart and are never exceeded across workers.

    Writing the database on every request cost more than every other defense
    together (measured in bench/), so quota is *leased*: a process takes a block
    of units from the database in one compare-and-swap (at most 64, and at most an
    eighth of what is left, so that several workers share the last units) and
    spends it in memory. The database total therefore never exceeds the quota.
    A clean shutdown returns unspent units; a crash forfeits at most one block per
    principal (the safe direction: under-serving, never over-serving). The token
    bucket lives in memory: it is short-term state that a restart may reset.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL: a commit survives a process crash without an fsync.
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA busy_timeout=5000")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS quota (principal TEXT PRIMARY KEY, day INTEGER NOT NULL, "
            "leased INTEGER NOT NULL, version INTEGER NOT NULL)"
        )
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS privacy_budget (principal TEXT PRIMARY KEY, window INTEGER NOT NULL, "
            "spent REAL NOT NULL, version INTEGER NOT NULL)"
        )
        self._usage: dict[str, _Usage] = {}
        self._leases: dict[str, _Lease] = {}
        self._lock = threading.Lock()

    async def acquire(self, principal: str, spec: LimitSpec, *, now: float, cost: int = 1) -> Admission:
        today = int(now // DAY)
        with self._lock:
            lease = self._leases.get(principal)
            if lease is None or lease.day != today:
                lease = self._leases[principal] = _Lease(today, 0, spec.daily_quota)
            usage = self._usage.get(principal)
            admission, new = admit(usage, _local(spec, lease), now=now, cost=cost)
            if admission.reason == "quota_exhausted" and self._lease(
                principal, lease, spec.daily_quota, cost
            ):
                admission, new = admit(usage, _local(spec, lease), now=now, cost=cost)
            self._usage[principal] = new
        remaining = lease.pool_left + lease.granted - new.used
        return Admission(admission.allowed, admission.reason, admission.retry_after, remaining)

    async def spend_budget(
        self, principal: str, *, cost: float, limit: float, now: float, window_seconds: float
    ) -> BudgetSpend:
        """Exact, not leased: a privacy budget must never be exceeded, whatever the workers do."""
        with self._lock:
            while True:
                row = self._conn.execute(
                    "SELECT spent, window, version FROM privacy_budget WHERE principal = ?", (principal,)
                ).fetchone()
                spent, window = (row[0], row[1]) if row is not None else (0.0, -1)
                decision, new_spent, new_window = spend(
                    spent, window, cost=cost, limit=limit, now=now, window_seconds=window_seconds
                )
                if not decision.allowed:
                    return decision
                if row is None:
                    cur = self._conn.execute(
                        "INSERT OR IGNORE INTO privacy_budget VALUES (?, ?, ?, 1)",
                        (principal, new_window, new_spent),
                    )
                else:
                    cur = self._conn.execute(
                        "UPDATE privacy_budget SET window = ?, spent = ?, version = version + 1 "
                        "WHERE principal = ? AND version = ?",
                        (new_window, new_spent, principal, row[2]),
                    )
                if cur.rowcount == 1:
                    return decision

    def _lease(self, principal: str, lease: _Lease, quota: int, cost: int) -> bool:
        """Take a block of quota from the database (compare-and-swap); False when none is left."""
        while True:
            row = self._conn.execute(
                "SELECT day, leased, version FROM quota WHERE principal = ?", (principal,)
            ).fetchone()
            leased = row[1] if row is not None and row[0] == lease.day else 0
            left = quota - leased
            if left < cost:
                lease.pool_left = max(0, left)
                return False
            block = min(left, max(cost, min(_LEASE_MAX, left // 8)))
            if row is None:
                cur = self._conn.execute(
                    "INSERT OR IGNORE INTO quota VALUES (?, ?, ?, 1)", (principal, lease.day, block)
                )
            else:
                cur = self._conn.execute(
                    "UPDATE quota SET day = ?, leased = ?, version = version + 1 WHERE principal = ? AND version = ?",
                    (lease.day, leased + block, principal, row[2]),
                )
            if cur.rowcount == 1:
                lease.granted += block
                lease.pool_left = left - block
                return True
            # Another worker leased first: read again.

    def close(self) -> None:
        """Give unspent leased units back, so a clean restart loses nothing."""
        with self._lock:
            for principal, lease in self._leases.items():
                usage = self._usage.get(principal)
                spent = usage.used if usage is not None and usage.day == lease.day else 0
                unspent = lease.granted - spent
                if unspent > 0:
                    self._conn.execute(
                        "UPDATE quota SET leased = leased - ?, version = version + 1 WHERE principal = ? AND day = ?",
                        (unspent, principal, lease.day),
                    )
            self._conn.close()


def _local(spec: LimitSpec, lease: _Lease) -> LimitSpec:
    """The same bucket, with the quota this process holds for today."""
    return LimitSpec(rate=spec.rate, burst=spec.burst, daily_quota=lease.granted)
