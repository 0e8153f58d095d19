"""The cost of recording one routed canary request (`Rollouts.observe`) as the window fills.

    .venv/bin/python bench/rollout_observe.py [--window-seconds 30] [--rates 100,1000,5000]

For each canary request rate, fills a `window_seconds` window at that rate (a fake clock), then
prints microseconds per `observe` with the window full, beside the previous algorithm (a list of
events, counted and re-sorted on every request) on the same window. The first must stay flat as
the rate grows; the second grows with the window's size.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from collections import deque
from pathlib import Path

from bastion.config import RolloutSettings
from bastion.rollout import Rollouts


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _current(rate: float, span: float, rows: list[int], seconds: list[float]) -> float:
    clock = _Clock()
    settings = RolloutSettings(
        stable="1",
        canary="2",
        min_requests=1,
        max_error_rate=1.0,
        max_p99_latency_ms=1e6,
        window_seconds=span,
    )
    with tempfile.TemporaryDirectory() as tmp:
        r = Rollouts({"m": settings}, Path(tmp) / "r.json", served=lambda m, v: True, clock=clock)
        fill = int(rate * span)
        for i in range(fill):  # the window full
            clock.now += 1 / rate
            r.observe(
                "m", "2", routed=True, inference_seconds=seconds[i % 1000], rows=rows[i % 1000], failed=False
            )
        calls = 20_000
        began = time.perf_counter()
        for i in range(calls):
            clock.now += 1 / rate
            r.observe(
                "m", "2", routed=True, inference_seconds=seconds[i % 1000], rows=rows[i % 1000], failed=False
            )
        return (time.perf_counter() - began) / calls * 1e6


def _previous(rate: float, span: float, seconds: list[float]) -> float:
    """The algorithm F9 replaced: append, expire, count errors and sort the latencies per request."""
    events: deque[tuple[float, bool, float]] = deque()
    now = 1000.0
    for i in range(int(rate * span)):
        now += 1 / rate
        events.append((now, False, seconds[i % 1000]))
    calls = max(20, min(2000, int(2e6 / len(events))))
    began = time.perf_counter()
    for i in range(calls):
        now += 1 / rate
        events.append((now, False, seconds[i % 1000]))
        while events and events[0][0] < now - span:
            events.popleft()
        n = len(events)
        errors = sum(1 for _, e, _ in events if e)
        latencies = sorted(lat for _, _, lat in events)
        _ = errors / n, latencies[min(n - 1, int(0.99 * n))]
    return (time.perf_counter() - began) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--window-seconds", type=float, default=30.0)
    parser.add_argument("--rates", default="100,1000,5000")
    args = parser.parse_args()
    rng = random.Random(0)
    rows = [rng.choice([1, 1, 1, 8, 256, 1000]) for _ in range(1000)]
    seconds = [0.0002 + 0.00002 * r * rng.uniform(0.5, 1.5) for r in rows]
    print(f"window {args.window_seconds:g} s")
    for rate in (float(x) for x in args.rates.split(",")):
        now = _current(rate, args.window_seconds, rows, seconds)
        before = _previous(rate, args.window_seconds, seconds)
        print(
            f"rate {rate:>7g}/s  window {int(rate * args.window_seconds):>7} requests  "
            f"observe {now:7.2f} us  (previous: {before:9.1f} us)"
        )


if __name__ == "__main__":
    main()
