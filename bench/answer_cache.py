"""The keyed answer cache's cost per answer as it fills past its bound (every answer distinct).

    .venv/bin/python bench/answer_cache.py [--max-entries 100000] [--answers 400000]

Prints microseconds per answer (a miss, then the store) for each slice of answers: it must stay
flat once the cache is full, or a long-running server slows down with its uptime.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from bastion.privacy import AnswerCache


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-entries", type=int, default=100_000)
    parser.add_argument("--answers", type=int, default=400_000)
    args = parser.parse_args()
    cache = AnswerCache(max_entries=args.max_entries)
    scores = np.array([[0.3, 0.7]])
    keys = [os.urandom(16) for _ in range(args.answers)]
    step = args.answers // 8
    for start in range(0, args.answers, step):
        began = time.perf_counter()
        for key in keys[start : start + step]:
            if cache.get(key, now=1.0) is None:
                cache.put(key, scores, expires=1e12)
        per = (time.perf_counter() - began) / step * 1e6
        print(f"answers {start + step:>8}  entries {len(cache):>7}  {per:6.2f} us per answer")


if __name__ == "__main__":
    main()
