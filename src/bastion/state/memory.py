"""In-process state: fastest, lost on restart, per worker (tests and a single process)."""

from __future__ import annotations

import threading

from bastion.state.base import Admission, BudgetKey, BudgetSpend, LimitSpec, _Usage, admit, spend


class MemoryStateStore:
    """In-process state: fastest, lost on restart, per worker."""

    def __init__(self) -> None:
        self._usage: dict[str, _Usage] = {}
        self._budgets: dict[BudgetKey, tuple[float, int]] = {}
        self._lock = threading.Lock()

    async def spend_budget(self, key: BudgetKey, *, cost: float, limit: float, now: float) -> BudgetSpend:
        with self._lock:
            spent, window = self._budgets.get(key, (0.0, -1))
            decision, spent, window = spend(
                spent, window, cost=cost, limit=limit, now=now, window_seconds=key.window_seconds
            )
            self._budgets[key] = (spent, window)
        return decision

    async def acquire(self, principal: str, spec: LimitSpec, *, now: float, cost: int = 1) -> Admission:
        with self._lock:
            admission, usage = admit(self._usage.get(principal), spec, now=now, cost=cost)
            self._usage[principal] = usage
        return admission

    def close(self) -> None:
        self._usage.clear()

    async def aclose(self) -> None:
        self.close()

    async def reachable(self) -> bool:
        return True
