"""Models isolated by query auditing: a small SQLite table shared by every worker and the CLI.

When several principals are flagged on one model within a window (one thief with many keys, or
many thieves), the model's `isolate_after` setting takes it out of service for everyone until an
operator releases it (`bastion models release NAME`). Off by default: isolation trades
availability for confidentiality, and a set of keys that get themselves flagged could use it to
take a model down, so an operator opts in per model. The check costs one `PRAGMA data_version`
per request to an isolating model, as key revocation does.

`IsolationRecords` is the interface; `IsolationStore` is the SQLite table (the embedded default),
`SharedIsolationStore` the same records in Redis or PostgreSQL (`bastion.records`), seen by every
replica within 0.25 s.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Protocol

from bastion.files import open_shared_sqlite
from bastion.records import UNCHANGED, Records, Watch, update

_SCHEMA = """
CREATE TABLE IF NOT EXISTS isolated_models (
    model  TEXT PRIMARY KEY,
    since  REAL NOT NULL,
    reason TEXT NOT NULL
);
"""


class IsolationRecords(Protocol):
    """Models taken out of service. Every method may raise `StateUnavailable` (503)."""

    def isolated(self, model: str) -> bool: ...

    def isolate(self, model: str, *, now: float, reason: str) -> bool:
        """True if the model was not isolated already."""
        ...

    def release(self, model: str) -> bool:
        """True if the model was isolated."""
        ...

    def list(self) -> list[tuple[str, float, str]]:
        """(model, since, reason), oldest first."""
        ...

    def close(self) -> None: ...


class IsolationStore:
    def __init__(self, path: Path) -> None:
        self._conn = open_shared_sqlite(path, _SCHEMA)
        self._lock = threading.Lock()
        self._seen_version: int | None = None
        self._isolated: frozenset[str] = frozenset()

    def close(self) -> None:
        self._conn.close()

    def isolated(self, model: str) -> bool:
        with self._lock:
            (version,) = self._conn.execute("PRAGMA data_version").fetchone()
            if version != self._seen_version:  # another connection (a worker, the CLI) committed
                rows = self._conn.execute("SELECT model FROM isolated_models").fetchall()
                self._isolated = frozenset(r[0] for r in rows)
                self._seen_version = version
            return model in self._isolated

    def isolate(self, model: str, *, now: float, reason: str) -> bool:
        """True if the model was not isolated already."""
        with self._lock:
            self._seen_version = None
            cur = self._conn.execute(
                "INSERT OR IGNORE INTO isolated_models VALUES (?, ?, ?)", (model, now, reason)
            )
        return cur.rowcount == 1

    def release(self, model: str) -> bool:
        """True if the model was isolated."""
        with self._lock:
            self._seen_version = None
            cur = self._conn.execute("DELETE FROM isolated_models WHERE model = ?", (model,))
        return cur.rowcount == 1

    def list(self) -> list[tuple[str, float, str]]:
        with self._lock:
            rows = self._conn.execute("SELECT model, since, reason FROM isolated_models ORDER BY since")
            return [(r[0], r[1], r[2]) for r in rows.fetchall()]


_ISOLATED = "isolated_models"  # the shared collection: model -> {since, reason}


class SharedIsolationStore:
    """Isolated models in Redis or PostgreSQL; the set is cached and read again when the
    collection's counter moved (checked at most every 0.25 s)."""

    def __init__(self, records: Records) -> None:
        self._records = records
        self._watch = Watch(records, _ISOLATED)
        self._lock = threading.Lock()
        self._isolated: frozenset[str] = frozenset()

    def close(self) -> None:
        self._records.close()

    def isolated(self, model: str) -> bool:
        with self._lock:
            if self._watch.stale():
                self._isolated = frozenset(self._records.items(_ISOLATED))
            return model in self._isolated

    def isolate(self, model: str, *, now: float, reason: str) -> bool:
        text = json.dumps({"since": now, "reason": reason}, sort_keys=True)
        changed = self._records.swap(_ISOLATED, model, None, text)
        with self._lock:
            self._watch.invalidate()
        return changed

    def release(self, model: str) -> bool:
        def change(current: dict[str, Any] | None) -> Any:
            return UNCHANGED if current is None else None

        changed = update(self._records, _ISOLATED, model, change)
        with self._lock:
            self._watch.invalidate()
        return changed

    def list(self) -> list[tuple[str, float, str]]:
        rows = [(m, json.loads(v)) for m, v in self._records.items(_ISOLATED).items()]
        return sorted(((m, float(r["since"]), str(r["reason"])) for m, r in rows), key=lambda r: r[1])
