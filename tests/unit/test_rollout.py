"""Canary routing and automatic rollback, with an injected clock and random source."""

from __future__ import annotations

from pathlib import Path

from bastion.config import RolloutSettings
from bastion.rollout import Rollouts, load_states, save_states


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
        results.append(r.observe("m", "2", routed=True, inference_seconds=0.001, failed=i % 2 == 0))
    assert results[:9] == [None] * 9  # not judged on fewer than min_requests
    rollback = results[9]
    assert rollback is not None and rollback.reason == "error_rate" and rollback.version == "2"
    assert "5 of 10 canary requests failed" in rollback.detail
    assert r.states["m"].weight == 0 and r.states["m"].status == "rolled_back"
    assert all(r.pick("m") == "1" for _ in range(50))  # every unversioned request back on stable
    assert r.observe("m", "2", routed=True, inference_seconds=0.0, failed=True) is None  # once only
    assert load_states(tmp_path / "rollouts.json")["m"].status == "rolled_back"  # persisted


def test_stable_errors_do_not_count_against_the_canary(tmp_path: Path) -> None:
    r = _rollouts(tmp_path, Clock(), min_requests=1, max_error_rate=0.0)
    assert all(
        r.observe("m", "1", routed=True, inference_seconds=1.0, failed=True) is None for _ in range(20)
    )
    assert r.states["m"].status == "canary"


def test_latency_rolls_back(tmp_path: Path) -> None:
    clock = Clock()
    r = _rollouts(tmp_path, clock, min_requests=5, max_p99_latency_ms=20)
    out = [
        r.observe("m", "2", routed=True, inference_seconds=lat, failed=False)
        for lat in (0.005, 0.006, 0.004, 0.005, 0.2)
    ]
    assert out[-1] is not None and out[-1].reason == "latency" and "p99 200.0 ms" in out[-1].detail


def test_old_events_leave_the_window(tmp_path: Path) -> None:
    clock = Clock()
    r = _rollouts(tmp_path, clock, min_requests=3, max_error_rate=0.5, window_seconds=10)
    r.observe("m", "2", routed=True, inference_seconds=0.0, failed=True)
    r.observe("m", "2", routed=True, inference_seconds=0.0, failed=True)
    clock.now += 60  # the two failures are now outside the window
    assert [r.observe("m", "2", routed=True, inference_seconds=0.0, failed=False) for _ in range(3)] == [
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
    explicit = [r.observe("m", "2", routed=False, inference_seconds=0.001, failed=True) for _ in range(50)]
    assert explicit == [None] * 50 and r.states["m"].status == "canary"
    for _ in range(200):  # a flood of explicit-version successes
        r.observe("m", "2", routed=False, inference_seconds=0.001, failed=False)
    routed = [
        r.observe("m", "2", routed=True, inference_seconds=0.001, failed=f)
        for f in (False, True, True, False)
    ]
    assert routed[-1] is not None and "2 of 4 canary requests failed" in routed[-1].detail


def test_requests_refused_before_the_runtime_are_not_evidence(tmp_path: Path) -> None:
    """A routed request the input guard (or limits, or authorization) refused never ran the model."""
    r = _rollouts(tmp_path, Clock(), min_requests=1, max_error_rate=0.0, max_p99_latency_ms=1)
    assert all(
        r.observe("m", "2", routed=True, inference_seconds=None, failed=False) is None for _ in range(50)
    )
    assert r.states["m"].status == "canary"
    # The runtime's own time is what counts: a slow runtime still rolls back.
    rollback = r.observe("m", "2", routed=True, inference_seconds=0.5, failed=False)
    assert rollback is not None and rollback.reason == "latency"
