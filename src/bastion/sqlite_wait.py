"""Bounded waits for a SQLite write lock held by another process (a sibling worker, the CLI).

A worker stopped or hung mid-transaction keeps its write lock as long as it is stopped. SQLite's own
busy handler sleeps inside the calling thread: on the event loop that freezes every request of this
process too. So a store on the loop opens its connection with no busy wait (`timeout=0`) and runs
each transaction through `retry_busy`: a busy lock is retried after an `asyncio.sleep` with a
growing back-off (1 ms up to 25 ms, close to SQLite's own), and past `LOCK_WAIT_SECONDS` the last
"database is locked" error is raised for the store to answer 503. A free lock costs nothing extra:
the first attempt is the whole transaction, as before.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

LOCK_WAIT_SECONDS = 1.5  # the longest a request waits for another process's write lock
_FIRST_SLEEP = 0.001
_MAX_SLEEP = 0.025


def is_busy(error: BaseException) -> bool:
    """Whether `error` is SQLite's "the lock is held by another connection" (SQLITE_BUSY)."""
    return isinstance(error, sqlite3.OperationalError) and getattr(error, "sqlite_errorcode", None) in (
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
    )


async def retry_busy(work: Callable[[], T], *, wait: float = LOCK_WAIT_SECONDS) -> T:
    """Run `work` (one whole transaction that takes no busy wait itself: it raises SQLITE_BUSY at
    once and leaves nothing open) until it does not find the lock busy, for at most `wait` seconds.
    Raises the last sqlite3.OperationalError (busy) past it, or whatever else `work` raises."""
    deadline = time.monotonic() + wait
    sleep = _FIRST_SLEEP
    while True:
        try:
            return work()
        except sqlite3.OperationalError as e:
            left = deadline - time.monotonic()
            if not is_busy(e) or left <= 0:
                raise
        await asyncio.sleep(min(sleep, left))
        sleep = min(sleep * 2, _MAX_SLEEP)
