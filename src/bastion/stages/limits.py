"""Rate limits and daily quotas per principal (token bucket + quota, consumed atomically)."""

from __future__ import annotations

from bastion.context import RequestContext
from bastion.errors import ErrorCode, RateLimited
from bastion.policy import Policy
from bastion.stages.address_limits import FailedAuthLimiter
from bastion.state import LimitSpec, StateStore

# A principal whose roles name no configured role still gets a (tight) limit, never none.
_FALLBACK = LimitSpec(rate=1.0, burst=1, daily_quota=1)


class EnforceLimits:
    def __init__(self, store: StateStore, policy: Policy, refusals: FailedAuthLimiter | None = None) -> None:
        """`refusals`: per principal and window, the first refusals past a limit get their own audit
        record and the rest are counted into one summary (a key flooding past its rate limit cost one
        durable record and fsync per request: red team #9 F11). None records every refusal."""
        self._store = store
        self._policy = policy
        self._refusals = refusals
        self._specs: dict[tuple[str, ...], LimitSpec] = {}

    def _spec(self, roles: tuple[str, ...]) -> LimitSpec:
        spec = self._specs.get(roles)
        if spec is None:
            # Several roles: the most generous of them applies.
            found = [r for r in (self._policy.role(n) for n in roles) if r is not None]
            spec = (
                LimitSpec(
                    rate=max(r.rate for r in found),
                    burst=max(r.burst for r in found),
                    daily_quota=max(r.daily_quota for r in found),
                )
                if found
                else _FALLBACK
            )
            self._specs[roles] = spec
        return spec

    async def __call__(self, ctx: RequestContext) -> None:
        assert ctx.principal is not None, "EnforceLimits runs after Authenticate"
        admission = await self._store.acquire(ctx.principal.id, self._spec(ctx.principal.roles), now=ctx.now)
        if not admission.allowed:
            if self._refusals is not None and not self._refusals.count(
                ctx.principal.id, admission.reason or "rate_limited", ctx.now
            ):
                ctx.audit_counted = True
            if admission.reason == "quota_exhausted":
                raise RateLimited(
                    "daily quota exhausted", retry_after=admission.retry_after, code=ErrorCode.QUOTA_EXHAUSTED
                )
            raise RateLimited("rate limit exceeded", retry_after=admission.retry_after)
