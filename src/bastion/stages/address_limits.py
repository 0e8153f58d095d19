"""Failed authentication, limited per client address before identity and before the audit log.

Rate limits per principal run after identity, so a caller with no valid credential was never
throttled, and each refusal cost a durable audit record. Here every address (IPv4 /32, IPv6 one
prefix, /64 by default: one host gets a whole /64) has a token bucket of failures: a failure takes a
token; with none left, everything from the address is refused (429 `auth_throttled`, Retry-After)
without checking the credential, valid keys included: a client sharing an address with an attacker
shares its penalty. A success costs nothing.

The audit keeps account of every refusal without growing at the attacker's pace: per address and
window, the first few are recorded one by one, the rest counted (with their reasons) into one
summary record written when the window closes or at shutdown; past a total per window, every
address's refusals are only counted.

Memory is bounded: at most `max_addresses` are tracked. A full table evicts its least recently
used address only when that address's bucket has refilled (forgetting it forgives nothing);
otherwise a new address shares one overflow bucket with every other untracked address, and when
that is empty untracked addresses are refused too: a flood from many addresses fails towards
throttling, never towards unlimited attempts.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bastion.context import RequestContext
from bastion.errors import AuthenticationFailed, AuthThrottled
from bastion.stages import Stage

OVERFLOW = "*"  # the shared entry of addresses the full table cannot hold
THROTTLED = "throttled"  # the reason tallied for a refusal by this limiter itself


@dataclass(frozen=True, slots=True)
class FailedAuthPolicy:
    """Rate in failures per second per address; windows in seconds."""

    rate: float = 0.5
    burst: int = 20
    ipv6_prefix: int = 64
    max_addresses: int = 10_000
    audited_per_window: int = 10
    audited_total_per_window: int = 1_000
    window_seconds: float = 60.0


@dataclass(slots=True)
class _Entry:
    tokens: float
    updated: float
    window: int = -1
    recorded: int = 0  # refusals recorded one by one in `window`
    counted: int = 0  # refusals only counted in `window`, not yet summarised
    reasons: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Refusal:
    """What to do with a refused request: seconds until it may retry, and whether its own audit
    record is written (False: it is counted into the address's summary instead)."""

    retry_after: float
    audit_individually: bool


def address_key(client: str | None, ipv6_prefix: int) -> str:
    """The unit a limit applies to: an IPv4 address, or the IPv6 network of `ipv6_prefix` bits."""
    if not client:
        return "unknown"
    if ":" not in client:  # uvicorn gives IPv4 in dotted form: the common case costs one test
        return client
    try:
        ip = ipaddress.IPv6Address(client.split("%", 1)[0])
    except ValueError:
        return "unknown"
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((ip, ipv6_prefix), strict=False))


class FailedAuthLimiter:
    """The buckets and the refusal accounting. Runs on the event loop only (no lock).

    `record` receives each summary record (an audit body without `seq`); `clock` is wall time in
    seconds, read by the window timer.
    """

    def __init__(
        self,
        policy: FailedAuthPolicy,
        *,
        record: Callable[[dict[str, Any]], None],
        clock: Callable[[], float],
        route: str = "refused_before_identity",
        subject: str = "client",
    ) -> None:
        """`route` and `subject`: the summary record's route, and the field that names whose refusals
        it counts (an address, `client`; or, for refusals past a principal's limits, `principal`)."""
        self.policy = policy
        self._record = record
        self._clock = clock
        self._route = route
        self._subject = subject
        self._table: dict[str, _Entry] = {}
        self._overflow = _Entry(tokens=float(policy.burst), updated=clock())
        self._pending: set[str] = set()  # keys with counted refusals not yet summarised
        self._window = -1
        self._recorded_in_window = 0
        self._timer: asyncio.TimerHandle | None = None
        # Read by the metrics.
        self.throttled_total = 0
        self.summarised_total = 0
        self.overflow_total = 0

    @property
    def tracked(self) -> int:
        return len(self._table)

    def key(self, client: str | None) -> str:
        return address_key(client, self.policy.ipv6_prefix)

    def check(self, key: str, now: float) -> Refusal | None:
        """None: the address may try to authenticate. A Refusal: its bucket (or, untracked in a
        full table, the overflow bucket) is empty; the refusal is already accounted."""
        entry = self._table.get(key)
        if entry is None:
            if len(self._table) < self.policy.max_addresses or self._make_room(now):
                return None
            entry, key = self._overflow, OVERFLOW
        if self._refill(entry, now) >= 1.0:
            return None
        self.throttled_total += 1
        retry = (1.0 - entry.tokens) / self.policy.rate
        return Refusal(retry, self._account(key, entry, THROTTLED, now))

    def count(self, key: str, reason: str, now: float) -> bool:
        """Account a refusal decided elsewhere (no bucket taken): True when it gets its own audit
        record, False when it is only counted into `key`'s summary for the window."""
        entry = self._entry(key, now)
        if entry is self._overflow:
            key = OVERFLOW
        return self._account(key, entry, reason, now)

    def failed(self, key: str, reason: str, now: float) -> bool:
        """Take a token for a failed authentication; True when it gets its own audit record."""
        entry = self._entry(key, now)
        if entry is self._overflow:
            key = OVERFLOW
        self._refill(entry, now)
        entry.tokens -= 1.0
        return self._account(key, entry, reason, now)

    def flush(self, now: float) -> None:
        """Write the summary of every address with counted refusals (at shutdown, or when a window ends)."""
        for key in sorted(self._pending):
            entry = self._overflow if key == OVERFLOW else self._table.get(key)
            if entry is not None:
                self._summarise(key, entry, now)
        self._pending.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- internals ---------------------------------------------------------------------------

    def _refill(self, entry: _Entry, now: float) -> float:
        if now > entry.updated:
            entry.tokens = min(
                float(self.policy.burst), entry.tokens + (now - entry.updated) * self.policy.rate
            )
            entry.updated = now
        return entry.tokens

    def _entry(self, key: str, now: float) -> _Entry:
        entry = self._table.pop(key, None)
        if entry is None:
            if len(self._table) >= self.policy.max_addresses and not self._make_room(now):
                self.overflow_total += 1
                return self._overflow
            entry = _Entry(tokens=float(self.policy.burst), updated=now)
        self._table[key] = entry  # most recently used last
        return entry

    def _make_room(self, now: float) -> bool:
        """Evict the least recently used address if forgetting it forgives nothing (its bucket is full)."""
        while len(self._table) >= self.policy.max_addresses:
            oldest = next(iter(self._table))
            entry = self._table[oldest]
            if self._refill(entry, now) < self.policy.burst:
                return False
            if oldest in self._pending:
                self._summarise(oldest, entry, now)
                self._pending.discard(oldest)
            del self._table[oldest]
        return True

    def _account(self, key: str, entry: _Entry, reason: str, now: float) -> bool:
        policy = self.policy
        window = int(now // policy.window_seconds)
        if window > self._window:
            if self._pending:
                self.flush(now)
            self._window, self._recorded_in_window = window, 0
        if entry.window != window:
            if entry.counted:  # an address whose summary was not written yet (evicted entries were)
                self._summarise(key, entry, now)
                self._pending.discard(key)
            entry.window, entry.recorded = window, 0
        if (
            entry.recorded < policy.audited_per_window
            and self._recorded_in_window < policy.audited_total_per_window
        ):
            entry.recorded += 1
            self._recorded_in_window += 1
            return True
        entry.counted += 1
        entry.reasons[reason] = entry.reasons.get(reason, 0) + 1
        self.summarised_total += 1
        self._pending.add(key)
        self._arm_timer(now)
        return False

    def _summarise(self, key: str, entry: _Entry, now: float) -> None:
        if not entry.counted:
            return
        start = entry.window * self.policy.window_seconds
        record: dict[str, Any] = {
            "ts": now,
            "request_id": None,
            "route": self._route,
            "action": None,
            "principal": None,
            "decision": "deny",
            "reason": "refusals_counted",
            "status": None,
            "payload_hmac": None,
            "client": None,
            "window_start": start,
            "window_seconds": self.policy.window_seconds,
            "recorded_individually": entry.recorded,
            "count": entry.counted,
            "reasons": dict(sorted(entry.reasons.items())),
        }
        # Whose refusals: the address (`client`), or the principal past its limits (`principal`).
        untracked = "(untracked addresses)" if self._subject == "client" else f"(untracked {self._subject}s)"
        record[self._subject] = untracked if key == OVERFLOW else key
        self._record(record)
        entry.counted = 0
        entry.reasons = {}

    def _arm_timer(self, now: float) -> None:
        if self._timer is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a unit test): the next refusal in a later window, or flush(), summarises
        end = (self._window + 1) * self.policy.window_seconds
        self._timer = loop.call_later(max(0.0, end - now) + 0.01, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now = self._clock()
        if int(now // self.policy.window_seconds) > self._window:
            self.flush(now)
        elif self._pending:
            self._arm_timer(now)


class ThrottleFailedAuth:
    """Stage: the address's failed-authentication bucket around identity (any `Authenticate`).

    Sets `ctx.audit_counted` for a refusal whose record the limiter only counts.
    """

    def __init__(self, limiter: FailedAuthLimiter, authenticate: Stage) -> None:
        self._limiter = limiter
        self._authenticate = authenticate

    async def __call__(self, ctx: RequestContext) -> None:
        key = self._limiter.key(ctx.client)
        refusal = self._limiter.check(key, ctx.now)
        if refusal is not None:
            if not refusal.audit_individually:
                ctx.audit_counted = True
            raise AuthThrottled(retry_after=refusal.retry_after)
        try:
            await self._authenticate(ctx)
        except AuthenticationFailed as e:
            if not self._limiter.failed(key, e.reason, ctx.now):
                ctx.audit_counted = True
            raise
