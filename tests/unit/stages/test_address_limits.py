"""The per-address failed-authentication limiter: buckets, refusal accounting, bounded memory.

Each field of FailedAuthPolicy (each `[limits]` failed_auth_* / refusal* field) is exercised here;
the end-to-end test (tests/e2e/test_auth_flood.py) drives the same code over HTTP from real addresses.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from bastion.assembly import failed_auth_policy
from bastion.config import Action, load_config
from bastion.context import RequestContext
from bastion.errors import AuthenticationFailed, AuthThrottled
from bastion.stages.address_limits import (
    OVERFLOW,
    FailedAuthLimiter,
    FailedAuthPolicy,
    ThrottleFailedAuth,
    address_key,
)


def limiter(**fields: Any) -> tuple[FailedAuthLimiter, list[dict[str, Any]]]:
    records: list[dict[str, Any]] = []
    return FailedAuthLimiter(FailedAuthPolicy(**fields), record=records.append, clock=lambda: 0.0), records


@pytest.mark.parametrize(
    ("client", "prefix", "expected"),
    [
        ("203.0.113.7", 64, "203.0.113.7"),
        ("2001:db8:1:2:aaaa::1", 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", 64, "2001:db8:1:2::/64"),  # the same /64: one attacker
        ("2001:db8:1:3::1", 64, "2001:db8:1:3::/64"),
        ("2001:db8:1:3::1", 48, "2001:db8:1::/48"),  # failed_auth_ipv6_prefix
        ("2001:db8:1:3::1", 128, "2001:db8:1:3::1/128"),
        ("::ffff:203.0.113.7", 64, "203.0.113.7"),  # IPv4-mapped: the IPv4 address
        ("fe80::1%eth0", 64, "fe80::/64"),
        (None, 64, "unknown"),
        ("not:an:address", 64, "unknown"),
    ],
)
def test_address_key_aggregates_ipv6_networks(client: str | None, prefix: int, expected: str) -> None:
    assert address_key(client, prefix) == expected


def test_burst_then_rate() -> None:
    lim, _ = limiter(rate=0.5, burst=3)
    for i in range(3):
        assert lim.check("a", 100.0 + i * 0.01) is None
        lim.failed("a", "unknown_key", 100.0 + i * 0.01)
    refusal = lim.check("a", 100.05)
    assert refusal is not None
    assert refusal.retry_after == pytest.approx((1 - 0.025) / 0.5, rel=0.05)  # 0.05 s refilled 0.025
    assert lim.check("a", 101.0) is not None  # half a token
    assert lim.check("a", 102.1) is None  # one token after 2 s at 0.5/s
    lim.failed("a", "unknown_key", 102.1)
    assert lim.check("a", 102.2) is not None
    assert lim.check("b", 102.2) is None  # another address is not affected


def test_success_costs_nothing() -> None:
    lim, _ = limiter(rate=0.01, burst=1)
    for i in range(100):
        assert lim.check("a", float(i)) is None  # checks alone (successful logins) never take a token
    assert lim.tracked == 0


def test_first_refusals_recorded_the_rest_counted_and_summarised_when_the_window_ends() -> None:
    lim, records = limiter(rate=1000.0, burst=1000, audited_per_window=3, window_seconds=60.0)
    individually = [
        lim.failed("a", "unknown_key" if i % 2 else "missing_credentials", 10.0) for i in range(10)
    ]
    assert individually == [True] * 3 + [False] * 7
    assert records == []  # nothing summarised while the window is open
    assert lim.failed("a", "unknown_key", 61.0) is True  # a new window: recorded again
    (summary,) = records
    assert summary["client"] == "a" and summary["count"] == 7
    assert summary["reasons"] == {"missing_credentials": 3, "unknown_key": 4}
    assert summary["window_start"] == 0.0 and summary["window_seconds"] == 60.0
    assert summary["recorded_individually"] == 3 and summary["decision"] == "deny"


def test_flush_at_shutdown_writes_the_open_windows() -> None:
    lim, records = limiter(rate=1000.0, burst=1000, audited_per_window=1)
    for key in ("a", "b", "c"):
        for _ in range(4):
            lim.failed(key, "wrong_secret", 5.0)
    lim.failed("d", "wrong_secret", 5.0)  # only its one recorded refusal: no summary needed
    lim.flush(6.0)
    assert [(r["client"], r["count"]) for r in records] == [("a", 3), ("b", 3), ("c", 3)]
    lim.flush(7.0)
    assert len(records) == 3  # nothing twice


def test_throttled_refusals_are_counted_too() -> None:
    lim, records = limiter(rate=0.001, burst=2, audited_per_window=2)
    lim.failed("a", "unknown_key", 1.0)
    lim.failed("a", "unknown_key", 1.0)
    refusals = [lim.check("a", 1.0) for _ in range(50)]
    assert all(r is not None and not r.audit_individually for r in refusals)
    lim.flush(2.0)
    assert records[0]["count"] == 50 and records[0]["reasons"] == {"throttled": 50}


def test_total_per_window_bounds_individual_records_across_addresses() -> None:
    lim, records = limiter(rate=1000.0, burst=1000, audited_per_window=5, audited_total_per_window=12)
    individually = [lim.failed(f"10.0.0.{i}", "unknown_key", 1.0) for i in range(100)]
    assert sum(individually) == 12
    lim.flush(2.0)
    assert sum(r["count"] for r in records) == 88


def test_full_table_fails_towards_throttling() -> None:
    """Many addresses: memory stays at max_addresses; new ones share one bucket, then are refused."""
    lim, records = limiter(rate=0.001, burst=2, max_addresses=4, audited_per_window=1)
    for i in range(4):  # fill the table with exhausted buckets
        lim.failed(f"10.0.0.{i}", "unknown_key", 1.0)
        lim.failed(f"10.0.0.{i}", "unknown_key", 1.0)
    assert lim.tracked == 4
    # Untracked addresses share the overflow bucket: two failures in all, then everyone untracked is refused.
    assert lim.check("10.0.1.1", 1.0) is None
    lim.failed("10.0.1.1", "unknown_key", 1.0)
    lim.failed("10.0.1.2", "unknown_key", 1.0)
    for i in range(1000):
        assert lim.check(f"10.0.2.{i}", 1.0) is not None
    assert lim.tracked == 4
    lim.flush(2.0)
    overflow = [r for r in records if r["client"] == "(untracked addresses)"]
    assert overflow and overflow[0]["count"] == 1001  # 1 failure + 1000 throttled past the one recorded
    assert OVERFLOW not in {r["client"] for r in records}


def test_full_table_evicts_only_addresses_whose_bucket_refilled() -> None:
    lim, records = limiter(rate=1.0, burst=2, max_addresses=2, audited_per_window=0)
    lim.failed("a", "unknown_key", 0.0)
    lim.failed("b", "unknown_key", 0.0)
    lim.failed("b", "unknown_key", 0.0)
    lim.failed("c", "unknown_key", 0.5)  # "a" has not refilled yet: c goes to the overflow bucket
    assert lim.tracked == 2
    lim.failed("c", "unknown_key", 5.0)  # now "a" has: it is summarised and forgotten, c is tracked
    assert lim.tracked == 2
    assert [(r["client"], r["count"]) for r in records] == [("a", 1)]
    assert lim.check("b", 5.0) is None  # b refilled too, but is kept


async def no_body(limit: int) -> bytes:
    return b""


def test_stage_refuses_before_authenticating_and_marks_counted_refusals() -> None:
    calls = []

    async def authenticate(ctx: RequestContext) -> None:
        calls.append(ctx.request_id)
        raise AuthenticationFailed("unknown_key")

    lim, _ = limiter(rate=0.001, burst=2, audited_per_window=1)
    stage = ThrottleFailedAuth(lim, authenticate)

    async def one(i: int) -> tuple[str, bool]:
        ctx = RequestContext(
            str(i), Action.METADATA, now=1.0, credentials=None, read_body=no_body, client="10.1.1.1"
        )
        try:
            await stage(ctx)
        except AuthThrottled as e:
            return f"throttled {e.status} {e.code} {e.retry_after > 0}", ctx.audit_counted
        except AuthenticationFailed:
            return "failed", ctx.audit_counted
        return "ok", False

    async def run() -> list[tuple[str, bool]]:
        return [await one(i) for i in range(4)]

    assert asyncio.run(run()) == [
        ("failed", False),
        ("failed", True),
        ("throttled 429 auth_throttled True", True),
        ("throttled 429 auth_throttled True", True),
    ]
    assert calls == ["0", "1"]  # a throttled request never reaches the credential check


@pytest.mark.slow
def test_window_timer_writes_the_summary_without_further_traffic() -> None:
    records: list[dict[str, Any]] = []
    lim = FailedAuthLimiter(
        FailedAuthPolicy(rate=1000.0, burst=1000, audited_per_window=0, window_seconds=1.0),
        record=records.append,
        clock=time.time,
    )

    async def run() -> None:
        for _ in range(3):
            lim.failed("a", "unknown_key", time.time())
        deadline = time.monotonic() + 3
        while not records and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    asyncio.run(run())
    assert len(records) == 1 and records[0]["count"] == 3


def test_every_config_field_reaches_the_policy(tmp_path: Path) -> None:
    path = tmp_path / "bastion.toml"
    path.write_text(
        "[limits]\nfailed_auth_rate = 0.25\nfailed_auth_burst = 7\nfailed_auth_ipv6_prefix = 56\n"
        "failed_auth_max_addresses = 99\nrefusals_audited_per_window = 4\n"
        "refusals_audited_total_per_window = 40\nrefusal_window_seconds = 30\n"
    )
    assert failed_auth_policy(load_config(path)) == FailedAuthPolicy(
        rate=0.25,
        burst=7,
        ipv6_prefix=56,
        max_addresses=99,
        audited_per_window=4,
        audited_total_per_window=40,
        window_seconds=30.0,
    )


@pytest.mark.parametrize(
    "line",
    [
        "failed_auth_rate = 0",
        "failed_auth_burst = 0",
        "failed_auth_ipv6_prefix = 16",
        "failed_auth_max_addresses = 0",
        "refusals_audited_per_window = -1",
        "refusal_window_seconds = 0.5",
    ],
)
def test_nonsense_limits_are_refused_naming_the_field(tmp_path: Path, line: str) -> None:
    from bastion.errors import ConfigError

    path = tmp_path / "bastion.toml"
    path.write_text(f"[limits]\n{line}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert f"{path}: limits.{line.split(' =')[0]}" in str(e.value)
