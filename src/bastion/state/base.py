"""Rate-limit and quota state behind a narrow, atomic interface.

`StateStore.acquire` checks the token bucket and the daily quota and consumes
both in one step, or neither: two workers can never both take the last unit.
The arithmetic lives in `admit`, shared by every backend; a backend only has to
read and write the two numbers atomically (a Redis backend will do it in one
Lua script).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from bastion.errors import StateUnavailable

log = logging.getLogger("bastion.state")

DAY = 86_400.0
# Float sums of epsilons: tolerate rounding error, never a whole answer.
BUDGET_SLACK = 1e-12


@dataclass(frozen=True, slots=True)
class LimitSpec:
    rate: float  # tokens per second
    burst: int  # bucket size
    daily_quota: int  # requests per UTC day


class Admission(NamedTuple):  # NamedTuple, not a frozen dataclass: built per request, ~5x cheaper
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
class BudgetKey:
    """One privacy-budget ledger row: whose budget, over what, in windows of what length.

    `principal` is a principal's id (`key:...`) or `EVERYONE` for a global budget that all
    principals share. `scope` names what the budget protects: the model's name and the unit
    spent (`epsilon`: dp_scores and aggregates; `rho`: private prediction). The model's *name*,
    not a version, digest, role or grant index: a new version, a canary, a reload that reorders
    grants or a key moved to another role all keep spending the same row, so none of them can
    hand out a fresh budget. Two grants on two models are two rows; a window of another length
    is another row (an operator changing the window starts a new account, as the period changes).
    """

    principal: str
    scope: str
    window_seconds: float

    @classmethod
    def for_model(cls, principal: str, model: str, unit: str, window_seconds: float) -> BudgetKey:
        return cls(principal, f"{model}/{unit}", float(window_seconds))

    def render(self) -> str:
        """The ledger's key string, the one place it is made. Principal ids, model names and units
        hold no '|', so the rendering is unambiguous."""
        return f"{self.principal}|{self.scope}|{float(self.window_seconds)!r}"


EVERYONE = "*"  # the principal of a global budget: no principal id (`key:...`) is "*"


class BudgetSpend(NamedTuple):
    allowed: bool
    remaining: float  # what is left in this window after this request
    retry_after: float  # seconds until the window renews (when refused)


def spend(
    spent: float, window: int, *, cost: float, limit: float, now: float, window_seconds: float
) -> tuple[BudgetSpend, float, int]:
    """Pure decision for a privacy budget: (decision, spent to store, window to store)."""
    current = int(now // window_seconds)
    used = spent if window == current else 0.0
    if used + cost > limit + BUDGET_SLACK:
        return BudgetSpend(False, max(0.0, limit - used), (current + 1) * window_seconds - now), used, current
    return BudgetSpend(True, limit - used - cost, 0.0), used + cost, current


class StateStore(Protocol):
    async def acquire(self, principal: str, spec: LimitSpec, *, now: float, cost: int = 1) -> Admission: ...

    async def spend_budget(self, key: BudgetKey, *, cost: float, limit: float, now: float) -> BudgetSpend:
        """Privacy filter: spend `cost` of `limit` in the key's current window, atomically, or refuse.
        A negative cost gives back what was spent (an answer that was not given after all)."""
        ...

    def close(self) -> None:
        """Release what can be released without the event loop (the CLI, after the server stopped)."""
        ...

    async def aclose(self) -> None:
        """Release everything, on the event loop (the server's shutdown)."""
        ...

    async def reachable(self) -> bool:
        """Whether the store can take decisions now (readiness)."""
        ...


def unavailable(error: Exception, source: str = "") -> StateUnavailable:
    """Log the failure (`source`: the setting and host:port, never the URL) and return the 503 to raise."""
    where = f" ({source})" if source else ""
    log.error("state store unavailable%s: %s", where, type(error).__name__)
    return StateUnavailable("rate-limit and privacy-budget state unavailable; nothing was answered", source=source)
