"""Canary routing and automatic rollback, with an injected clock and random source."""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pytest

from bastion.config import RolloutSettings
from bastion.rollout import (
    MAX_PRINCIPALS,
    QUANTILE_RELATIVE_ERROR,
    Rollouts,
    _Window,
    load_states,
    save_states,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _rollouts(tmp_path: Path, clock: Clock, draws: list[float] | None = None, **settings: object) -> Rollouts:
    it = iter(draws or [])
    spec = RolloutSettings(stable="1", canary="2", **settings)  # type: ignore[arg-type]
    return Rollouts(
        {"m": spec},
        tmp_path / "rollouts.json",
        served=lambda m, v: True,
        clock=clock,
        random=lambda: next(it, 0.99),
    )


def test_weighted_routing(tmp_path: Path) -> None:
    r = _rollouts(tmp_path, Clock(), draws=[0.05, 0.5, 0.09, 0.1], canary_weight=0.1)
    assert [r.pick("m") for _ in range(4)] == ["2", "1", "2", "1"]
    assert r.pick("other") is None  # no rollout: the newest version serves


def test_error_rate_rolls_back_after_min_requests(tmp_path: Path) -> None:
    clock = Clock()
    r = _rollouts(tmp_path, clock, draws=[0.0] * 100, canary_weight=0.5, min_requests=10, max_error_rate=0.2)
    results = []
    for i in range(10):
        clock.now += 0.1
        results.append(
            r.observe(
                "m", "2", principal="key:a", routed=True, rows=1, inference_seconds=0.001, failed=i % 2 == 0
            )
        )
    assert results[:9] == [None] * 9  # not judged on fewer than min_requests
    rollback = results[9]
    assert rollback is not None and rollback.reason == "error_rate" and rollback.version == "2"
    assert "5 of 10 canary requests failed" in rollback.detail
    assert r.states["m"].weight == 0 and r.states["m"].status == "rolled_back"
    assert all(r.pick("m") == "1" for _ in range(50))  # every unversioned request back on stable
    assert (
        r.observe("m", "2", principal="key:a", routed=True, rows=1, inference_seconds=0.0, failed=True)
        is None
    )  # once only
    assert load_states(tmp_path / "rollouts.json")["m"].status == "rolled_back"  # persisted


def test_stable_errors_do_not_count_against_the_canary(tmp_path: Path) -> None:
    r = _rollouts(tmp_path, Clock(), min_requests=1, max_error_rate=0.0)
    assert all(
        r.observe("m", "1", principal="key:a", routed=True, rows=1, inference_seconds=1.0, failed=True)
        is None
        for _ in range(20)
    )
    assert r.states["m"].status == "canary"


def test_latency_rolls_back(tmp_path: Path) -> None:
    clock = Clock()
    r = _rollouts(tmp_path, clock, min_requests=5, max_p99_latency_ms=20)
    out = [
        r.observe("m", "2", principal="key:a", routed=True, rows=1, inference_seconds=lat, failed=False)
        for lat in (0.005, 0.006, 0.004, 0.005, 0.2)
    ]
    assert out[-1] is not None and out[-1].reason == "latency"
    reported = re.search(r"p99 ([0-9.]+) ms per row over 20 ms \(1 of 5 requests over\)", out[-1].detail)
    assert reported is not None and abs(float(reported[1]) / 200 - 1) <= QUANTILE_RELATIVE_ERROR


def test_old_events_leave_the_window(tmp_path: Path) -> None:
    clock = Clock()
    r = _rollouts(tmp_path, clock, min_requests=3, max_error_rate=0.5, window_seconds=10)
    r.observe("m", "2", principal="key:a", routed=True, rows=1, inference_seconds=0.0, failed=True)
    r.observe("m", "2", principal="key:a", routed=True, rows=1, inference_seconds=0.0, failed=True)
    clock.now += 60  # the two failures are now outside the window
    assert [
        r.observe("m", "2", principal="key:a", routed=True, rows=1, inference_seconds=0.0, failed=False)
        for _ in range(3)
    ] == [
        None,
        None,
        None,
    ]


def test_operator_changes_reach_a_running_router_within_a_second(tmp_path: Path) -> None:
    clock = Clock()
    r = _rollouts(tmp_path, clock, draws=[0.0] * 10, canary_weight=1.0)
    assert r.pick("m") == "2"
    states = load_states(tmp_path / "rollouts.json")
    states["m"].stable, states["m"].canary, states["m"].weight, states["m"].status = (
        "2",
        None,
        0.0,
        "promoted",
    )
    save_states(tmp_path / "rollouts.json", states)
    clock.now += 1.5
    assert r.pick("m") == "2" and r.states["m"].status == "promoted"
    # A restart with the same config keeps the promotion, as it keeps a rollback.
    again = _rollouts(tmp_path, clock, canary_weight=1.0)
    assert again.states["m"].status == "promoted" and again.pick("m") == "2"


def test_canary_refused_at_load_starts_rolled_back(tmp_path: Path) -> None:
    spec = RolloutSettings(stable="1", canary="2")
    r = Rollouts({"m": spec}, tmp_path / "r.json", served=lambda m, v: v == "1", clock=Clock())
    assert r.states["m"].status == "rolled_back" and "refused at load" in r.states["m"].reason
    assert r.pick("m") == "1"


def test_requests_naming_the_canary_neither_trigger_nor_dilute(tmp_path: Path) -> None:
    """A client that picks version 2 itself is not evidence: its failures cannot roll the canary back,
    and its successes cannot hide the canary's failures on routed traffic."""
    r = _rollouts(tmp_path, Clock(), min_requests=4, max_error_rate=0.25)
    explicit = [
        r.observe("m", "2", principal="key:a", routed=False, rows=1, inference_seconds=0.001, failed=True)
        for _ in range(50)
    ]
    assert explicit == [None] * 50 and r.states["m"].status == "canary"
    for _ in range(200):  # a flood of explicit-version successes
        r.observe("m", "2", principal="key:a", routed=False, rows=1, inference_seconds=0.001, failed=False)
    routed = [
        r.observe("m", "2", principal="key:a", routed=True, rows=1, inference_seconds=0.001, failed=f)
        for f in (False, True, True, False)
    ]
    assert routed[-1] is not None and "2 of 4 canary requests failed" in routed[-1].detail


def test_requests_refused_before_the_runtime_are_not_evidence(tmp_path: Path) -> None:
    """A routed request the input guard (or limits, or authorization) refused never ran the model."""
    r = _rollouts(tmp_path, Clock(), min_requests=1, max_error_rate=0.0, max_p99_latency_ms=1)
    assert all(
        r.observe("m", "2", principal="key:a", routed=True, rows=1, inference_seconds=None, failed=False)
        is None
        for _ in range(50)
    )
    assert r.states["m"].status == "canary"
    # The runtime's own time is what counts: a slow runtime still rolls back.
    rollback = r.observe(
        "m", "2", principal="key:a", routed=True, rows=1, inference_seconds=0.5, failed=False
    )
    assert rollback is not None and rollback.reason == "latency"


def _runtime_seconds(rows: int, *, overhead: float, per_row: float) -> float:
    """A runtime's time for a batch: a fixed cost per call plus a cost per row."""
    return overhead + per_row * rows


@pytest.mark.parametrize("attack_rows", [256, 1000, "mixed"])
def test_max_row_batches_do_not_trigger_a_latency_rollback(tmp_path: Path, attack_rows: object) -> None:
    """F9: a key with `infer` sends big batches to the unversioned route; those routed to a canary
    that is normal per row take longer per batch than the threshold, and must not roll it back."""
    clock = Clock()
    r = _rollouts(tmp_path, clock, min_requests=20, max_p99_latency_ms=1.0, max_error_rate=0.5)
    rng = random.Random(9)
    batch_seconds = []
    for i in range(2000):
        clock.now += 0.005
        rows = attack_rows if isinstance(attack_rows, int) else rng.choice([2, 64, 256, 999, 1000])
        if i % 4 == 0:  # a genuine client's one-row request
            rows = 1
        seconds = _runtime_seconds(rows, overhead=0.0003, per_row=0.00002 * rng.uniform(0.5, 1.5))
        batch_seconds.append(seconds)
        assert (
            r.observe(
                "m", "2", principal="key:a", routed=True, inference_seconds=seconds, rows=rows, failed=False
            )
            is None
        )
    # Judged per batch, these requests would have rolled the canary back: the threshold is 1 ms.
    assert sorted(batch_seconds)[int(0.99 * len(batch_seconds))] * 1000 > 1.0
    assert r.states["m"].status == "canary" and r.states["m"].weight > 0


@pytest.mark.parametrize("rows", [1, 7, 256, 1000])
def test_a_canary_slow_per_row_rolls_back_at_any_batch_size(tmp_path: Path, rows: int) -> None:
    clock = Clock()
    r = _rollouts(tmp_path, clock, min_requests=20, max_p99_latency_ms=1.0)
    out = []
    for _ in range(20):
        clock.now += 0.01
        seconds = _runtime_seconds(rows, overhead=0.0003, per_row=0.004)  # 4 ms a row
        out.append(
            r.observe(
                "m", "2", principal="key:a", routed=True, inference_seconds=seconds, rows=rows, failed=False
            )
        )
    assert out[:19] == [None] * 19  # judged only from min_requests on
    rollback = out[19]
    assert rollback is not None and rollback.reason == "latency" and r.states["m"].weight == 0
    reported = re.search(r"p99 ([0-9.]+) ms per row", rollback.detail)
    expected = (0.0003 / rows + 0.004) * 1000
    assert reported is not None and abs(float(reported[1]) / expected - 1) <= QUANTILE_RELATIVE_ERROR


def test_a_few_slow_requests_among_many_are_under_the_p99(tmp_path: Path) -> None:
    """p99: 1 % of requests may be slow; more than that rolls back (nearest rank, as numpy's)."""
    clock = Clock()
    r = _rollouts(tmp_path, clock, min_requests=100, max_p99_latency_ms=1.0)
    for i in range(200):
        clock.now += 0.01
        slow = i in {0, 199}  # at most 1 %: never more than the values above the p99's rank
        out = r.observe(
            "m",
            "2",
            principal="key:a",
            routed=True,
            inference_seconds=0.01 if slow else 0.0001,
            rows=1,
            failed=False,
        )
        assert out is None
    clock.now += 0.01
    out = r.observe("m", "2", principal="key:a", routed=True, inference_seconds=0.01, rows=1, failed=False)
    assert out is not None and "(3 of 201 requests over)" in out.detail


@pytest.mark.parametrize("n", [1, 20, 99, 100, 101, 1000, 12345])
def test_p99_matches_numpy_within_the_stated_error(n: int) -> None:
    rng = np.random.default_rng(n)
    values = rng.lognormal(mean=-9, sigma=2.5, size=n)  # per-row seconds, ~10 ns to ~10 ms
    window = _Window(span=30.0, slow_above=None)
    for v in values:
        window.add(1000.0, False, float(v))
    exact = float(np.quantile(values, 0.99, method="inverted_cdf"))
    assert abs(window.p99() / exact - 1) <= QUANTILE_RELATIVE_ERROR * (1 + 1e-9)
    assert QUANTILE_RELATIVE_ERROR < 0.025


@pytest.mark.parametrize("seed", range(5))
def test_the_latency_verdict_is_exact(seed: int) -> None:
    """Whether the p99 is over the threshold is decided from exact counts, not the histogram: the
    verdict agrees with numpy's p99 even for a threshold inside the p99's histogram bucket."""
    rng = np.random.default_rng(seed)
    values = rng.exponential(0.001, size=int(rng.integers(1, 3000)))
    exact = float(np.quantile(values, 0.99, method="inverted_cdf"))
    for threshold in (exact, exact * (1 - 1e-9), exact * 0.999, exact * 1.001, float(np.median(values))):
        window = _Window(span=30.0, slow_above=threshold)
        for v in values:
            window.add(1000.0, False, float(v))
        assert window.p99_over_threshold() == (exact > threshold)


def test_the_window_stays_bounded_and_slides(tmp_path: Path) -> None:
    """Memory is 32 slices of counts however many requests arrive; old slices leave, and a clock
    that steps back is counted in the newest slice rather than corrupting the order."""
    window = _Window(span=32.0, slow_above=0.001)
    for i in range(64_000):
        window.add(1000.0 + i / 1000, i % 10 == 0, 0.002 if i % 100 == 0 else 0.0001)
    assert len(window._slices) <= 32
    assert 31_000 <= window.requests <= 32_000  # the last 31-32 s of 64 s
    assert window.errors == pytest.approx(window.requests / 10, abs=2)
    assert window.slow == pytest.approx(window.requests / 100, abs=2)
    window.add(900.0, True, 0.0)  # the clock stepped back
    assert window.requests <= 32_001 and len(window._slices) <= 32


def test_the_rollout_state_file_is_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    import os

    path = tmp_path / "rollouts.json"
    previous = os.umask(0o022)
    try:
        save_states(path, {})
        (tmp_path / "rollouts.json.tmp").write_text("{}")  # a leftover from a crash, world-readable
        os.chmod(tmp_path / "rollouts.json.tmp", 0o644)
        save_states(path, {})
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o600


# -- F8 (red team of issue 9): one principal's volume must not outweigh the others' evidence --------


def _send(
    r: Rollouts, clock: Clock, who: str, n: int, *, failed: bool = False, per_row: float = 0.0001
) -> list:
    out = []
    for _ in range(n):
        clock.now += 0.001
        out.append(
            r.observe("m", "2", principal=who, routed=True, inference_seconds=per_row, rows=1, failed=failed)
        )
    return out


def test_one_keys_flood_of_good_requests_does_not_hide_a_regression(tmp_path: Path) -> None:
    """F8: 2,000 good routed requests from one key, then five genuine keys whose requests fail one in
    five. Pooled, that was 10 of 2,050 (under 5 %); the flooding key now weighs 20 requests."""
    clock = Clock()
    r = _rollouts(tmp_path, clock, min_requests=20, max_error_rate=0.05, window_seconds=600)
    assert _send(r, clock, "key:flood", 2000) == [None] * 2000  # a verdict, and a healthy one
    rollbacks = []
    for i in range(10):
        for who in ("key:a", "key:b", "key:c", "key:d", "key:e"):
            rollbacks += [x for x in _send(r, clock, who, 1, failed=i % 5 == 0) if x is not None]
    assert r.states["m"].status == "rolled_back" and len(rollbacks) == 1
    assert rollbacks[0].reason == "error_rate"
    assert "each principal counted for at most 20" in rollbacks[0].detail
    assert re.search(r"\(2 of 20\d\d canary requests failed; \d principals\)", rollbacks[0].detail)


def test_one_keys_flood_of_fast_rows_does_not_hide_a_slow_canary(tmp_path: Path) -> None:
    """The latency side: a key's many fast (big-batch) requests no longer pull the canary's p99 under
    the threshold while a few genuine keys see it slow."""
    clock = Clock()
    r = _rollouts(tmp_path, clock, min_requests=20, max_p99_latency_ms=1.0, window_seconds=600)
    assert _send(r, clock, "key:flood", 5000, per_row=0.00001) == [None] * 5000
    out = []
    for who in ("key:a", "key:b", "key:c"):
        out += _send(r, clock, who, 2, per_row=0.01)  # 10 ms a row: 6 of 5,006 pooled, 6 of 26 weighted
    rollback = next(x for x in out if x is not None)
    assert rollback.reason == "latency" and "p99 per row over 1 ms" in rollback.detail


def test_one_keys_failing_requests_weigh_at_most_the_cap(tmp_path: Path) -> None:
    """The other direction: a key that found input the canary's runtime fails on counts for `cap`
    requests, not its volume. 40 genuine keys' 200 good requests and 1,000 failures of one key: 20
    of 220 (9 %) under a 10 % threshold; pooled it was 1,000 of 1,200."""
    clock = Clock()
    r = _rollouts(tmp_path, clock, min_requests=20, max_error_rate=0.10, window_seconds=600)
    for i in range(40):
        _send(r, clock, f"key:g{i}", 5)
    assert _send(r, clock, "key:prober", 1000, failed=True) == [None] * 1000
    assert r.states["m"].status == "canary"


def test_many_keys_weigh_as_many_principals(tmp_path: Path) -> None:
    """What remains (README): each key weighs up to `cap`, so k flooding keys add k x cap good
    requests: against one genuine key failing a quarter of its requests, 4 keys still dilute it to
    5 % (20 x 0.25 / 100), 3 do not."""
    for keys, rolled_back in ((3, True), (4, False)):
        clock = Clock()
        (tmp_path / str(keys)).mkdir()
        r = _rollouts(tmp_path / str(keys), clock, min_requests=20, max_error_rate=0.05, window_seconds=600)
        for k in range(keys):
            _send(r, clock, f"key:flood{k}", 500)
        for i in range(40):
            _send(r, clock, "key:genuine", 1, failed=i % 4 == 3)
        assert (r.states["m"].status == "rolled_back") is rolled_back


def test_max_requests_per_principal_sets_the_cap(tmp_path: Path) -> None:
    """`max_requests_per_principal`: with 5, the flooding key weighs 5 requests against the genuine
    key's 10, 3 of them failed: 3 of 15 > 15 %; with 50, 3 of 60 is not."""
    for cap, rolled_back in ((5, True), (50, False)):
        clock = Clock()
        (tmp_path / str(cap)).mkdir()
        r = _rollouts(
            tmp_path / str(cap),
            clock,
            min_requests=10,
            max_error_rate=0.15,
            window_seconds=600,
            max_requests_per_principal=cap,
        )
        _send(r, clock, "key:flood", 300)
        for i in range(10):
            _send(r, clock, "key:genuine", 1, failed=i >= 7)
        assert (r.states["m"].status == "rolled_back") is rolled_back, cap


def test_a_principal_weighs_again_once_its_flood_leaves_the_window(tmp_path: Path) -> None:
    window = _Window(span=32.0, slow_above=None, cap=20)
    for i in range(1000):
        window.add(1000.0 + i / 1000, False, 0.0001, "key:flood")
    assert (window.requests, window.weight, window.principals) == (1000, 20, 1)
    for i in range(10):
        window.add(1040.0 + i, i < 5, 0.0001, "key:genuine")  # the flood is over 32 s old by now
    assert (window.requests, window.weight, window.principals) == (10, 10, 1)
    assert window.errors_over(0.49) and not window.errors_over(0.5)


def test_weighted_verdicts_are_exact_at_the_bound() -> None:
    """A principal over the cap weighs errors x cap / n: with cap 7, 7 slow (or failed) of 700 is
    exactly 1 % (not over the p99), 8 of 701 is over; 7 x 7 / 700 in floating point is not exact,
    the verdict is."""
    solo = _Window(span=30.0, slow_above=0.001, cap=7)
    for i in range(700):
        solo.add(1000.0, i < 7, 0.01 if i < 7 else 0.0001, "key:a")
    assert solo.weight == 7 and not solo.p99_over_threshold() and not solo.errors_over(0.01)
    solo.add(1000.0, True, 0.01, "key:a")
    assert solo.p99_over_threshold() and solo.errors_over(0.01)


def test_the_principals_told_apart_are_bounded() -> None:
    """Past MAX_PRINCIPALS in a window, further principals count together as one: memory stays
    bounded, and a flood of fresh principals weighs one cap more, not one each."""
    window = _Window(span=30.0, slow_above=None, cap=20)
    for i in range(MAX_PRINCIPALS + 500):
        for _ in range(30):
            window.add(1000.0, False, 0.0001, f"key:{i}")
    assert window.principals == MAX_PRINCIPALS + 1
    assert window.weight == (MAX_PRINCIPALS + 1) * 20
    assert all(len(s.principals) <= MAX_PRINCIPALS + 1 for s in window._slices)
