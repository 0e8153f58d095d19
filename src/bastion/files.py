"""Writing secrets to disk: owner-only from the first byte, never over an existing file."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

from bastion.statedir import PRIVATE_DIR, make_private_sqlite


def enable_wal(conn: sqlite3.Connection, *, wait_seconds: float = 5.0) -> None:
    """Switch `conn`'s database to WAL, retrying while another process holds it: on a fresh file the
    switch needs SQLite's exclusive lock and fails at once ("database is locked") without calling
    the busy handler, as when several workers open a new state directory together. At open only."""
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def open_shared_sqlite(path: Path, schema: str) -> sqlite3.Connection:
    """A SQLite file that other processes (workers, the CLI) open too: WAL, autocommit, a 5 s wait
    on a busy lock, the schema created if missing, owner-only (with its -wal and -shm)."""
    make_private_sqlite(path)
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    enable_wal(conn)
    conn.execute("PRAGMA busy_timeout=5000")
    conn.executescript(schema)
    return conn


def write_private_file(path: Path, data: bytes) -> None:
    """Create `path` with mode 0600 and write `data`; FileExistsError if it exists (a key is never replaced).
    A missing directory is created 0700 (an existing one, perhaps the caller's own, is left as it is)."""
    path.parent.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
