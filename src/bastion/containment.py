"""The containment ladder: graded, reversible measures against one principal on one model.

Query auditing flags a principal (`stages/query_audit.py`); the model's ladder says what its 1st,
2nd, 3rd... incident on that model does (the last step repeats): record it only; **throttle** its
requests to this model; **degrade** its answers to a lower output detail; **reroute** it to the
stable version during a rollout; quarantine the key (everywhere); isolate the model (for everyone).
The timed measures (throttle, degrade, reroute) live here, in a small SQLite table beside the keys,
shared by every worker and the CLI; they end by themselves after `containment_seconds`, or when an
operator releases the key (`bastion keys release`, `POST /v2/admin/keys/{key_id}/release`).

`MeasureRecords` is the interface; `MeasureStore` is the SQLite table (the embedded default),
`SharedMeasureStore` the same measures in Redis or PostgreSQL (`bastion.records`), seen by every
replica within 0.25 s.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from bastion.files import open_shared_sqlite
from bastion.records import UNCHANGED, Records, Watch, update

STEPS = ("record", "throttle", "degrade", "reroute", "quarantine", "isolate")


@dataclass(frozen=True, slots=True)
class ContainmentPolicy:
    """A model's ladder and the parameters of its timed steps (from the policy file)."""

    steps: tuple[str, ...] = ("quarantine",)
    throttle_rate: float = 0.1  # requests a second while throttled
    degrade_to: str = "label"  # an OutputDetail value
    seconds: float = 3600.0  # how long throttle, degrade and reroute last

    def step(self, incidents_before: int) -> str:
        """The step for a principal with `incidents_before` earlier incidents on this model."""
        return self.steps[min(incidents_before, len(self.steps) - 1)]


@dataclass(frozen=True, slots=True)
class Measures:
    """What is in force for one principal on one model now (None / False: nothing)."""

    throttle_rate: float | None = None
    degrade_to: str | None = None
    reroute: bool = False

    def __bool__(self) -> bool:
        return self.throttle_rate is not None or self.degrade_to is not None or self.reroute


NONE = Measures()

_SCHEMA = """
CREATE TABLE IF NOT EXISTS measures (
    principal TEXT NOT NULL,
    model     TEXT NOT NULL,
    kind      TEXT NOT NULL,
    value     TEXT,
    since     REAL NOT NULL,
    until     REAL NOT NULL,
    PRIMARY KEY (principal, model, kind)
);
"""


class MeasureRecords(Protocol):
    """Timed measures by (principal, model). Every method may raise `StateUnavailable` (503)."""

    def apply(self, principal: str, model: str, kind: str, *, value: str | None, now: float, until: float) -> None:
        """Put a measure in force until `until` (replacing the same kind's, if any)."""
        ...

    def active(self, principal: str, model: str, *, now: float) -> Measures: ...

    def release(self, principal: str) -> int:
        """Lift every measure on a principal; how many were lifted (expired ones included)."""
        ...

    def list(self, *, now: float) -> list[tuple[str, str, str, str | None, float]]:
        """(principal, model, kind, value, until) for the measures in force, oldest first."""
        ...

    def close(self) -> None: ...


def _in_force(found: list[tuple[str, str | None, float]] | None, now: float) -> Measures:
    if not found:
        return NONE
    live = [(kind, value) for kind, value, until in found if until > now]
    if not live:
        return NONE
    throttle = next((float(v) for k, v in live if k == "throttle" and v is not None), None)
    degrade = next((v for k, v in live if k == "degrade"), None)
    return Measures(throttle, degrade, any(k == "reroute" for k, _ in live))


class MeasureStore:
    """Timed measures by (principal, model). Reads cost one `PRAGMA data_version` when nothing
    changed (the table is re-read only after another connection commits), as isolation's do."""

    def __init__(self, path: Path) -> None:
        self._conn = open_shared_sqlite(path, _SCHEMA)
        self._lock = threading.Lock()
        self._seen_version: int | None = None
        self._rows: dict[tuple[str, str], list[tuple[str, str | None, float]]] = {}

    def close(self) -> None:
        self._conn.close()

    def apply(self, principal: str, model: str, kind: str, *, value: str | None, now: float, until: float) -> None:
        """Put a measure in force until `until` (replacing the same kind's, if any)."""
        assert kind in ("throttle", "degrade", "reroute")
        with self._lock:
            self._seen_version = None
            self._conn.execute(
                "INSERT OR REPLACE INTO measures VALUES (?, ?, ?, ?, ?, ?)", (principal, model, kind, value, now, until)
            )

    def active(self, principal: str, model: str, *, now: float) -> Measures:
        with self._lock:
            (version,) = self._conn.execute("PRAGMA data_version").fetchone()
            if version != self._seen_version:
                rows: dict[tuple[str, str], list[tuple[str, str | None, float]]] = {}
                for who, name, kind, value, until in self._conn.execute(
                    "SELECT principal, model, kind, value, until FROM measures"
                ):
                    rows.setdefault((who, name), []).append((kind, value, until))
                self._rows, self._seen_version = rows, version
            found = self._rows.get((principal, model))
        return _in_force(found, now)

    def release(self, principal: str) -> int:
        """Lift every measure on a principal; returns how many were lifted (expired ones included)."""
        with self._lock:
            self._seen_version = None
            cur = self._conn.execute("DELETE FROM measures WHERE principal = ?", (principal,))
        return cur.rowcount

    def list(self, *, now: float) -> list[tuple[str, str, str, str | None, float]]:
        """(principal, model, kind, value, until) for the measures in force."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT principal, model, kind, value, until FROM measures WHERE until > ? ORDER BY since", (now,)
            ).fetchall()
        return [(r[0], r[1], r[2], r[3], r[4]) for r in rows]


_MEASURES = "measures"  # the shared collection: JSON [principal, model, kind] -> {value, since, until}


class SharedMeasureStore:
    """Timed measures in Redis or PostgreSQL; cached, and read again when the collection's counter
    moved (checked at most every 0.25 s)."""

    def __init__(self, records: Records) -> None:
        self._records = records
        self._watch = Watch(records, _MEASURES)
        self._lock = threading.Lock()
        self._rows: dict[tuple[str, str], list[tuple[str, str | None, float]]] = {}

    def close(self) -> None:
        self._records.close()

    def _all(self) -> list[tuple[str, str, str, dict[str, Any]]]:
        found = []
        for key, text in self._records.items(_MEASURES).items():
            principal, model, kind = json.loads(key)
            found.append((principal, model, kind, json.loads(text)))
        return found

    def apply(self, principal: str, model: str, kind: str, *, value: str | None, now: float, until: float) -> None:
        assert kind in ("throttle", "degrade", "reroute")
        key = json.dumps([principal, model, kind])
        update(self._records, _MEASURES, key, lambda _: {"value": value, "since": now, "until": until})
        with self._lock:
            self._watch.invalidate()

    def active(self, principal: str, model: str, *, now: float) -> Measures:
        with self._lock:
            if self._watch.stale():
                rows: dict[tuple[str, str], list[tuple[str, str | None, float]]] = {}
                for who, name, kind, m in self._all():
                    rows.setdefault((who, name), []).append((kind, m["value"], float(m["until"])))
                self._rows = rows
            found = self._rows.get((principal, model))
        return _in_force(found, now)

    def release(self, principal: str) -> int:
        lifted = 0
        for key in self._records.items(_MEASURES):
            if json.loads(key)[0] == principal:
                lifted += update(
                    self._records, _MEASURES, key, lambda current: UNCHANGED if current is None else None
                )
        with self._lock:
            self._watch.invalidate()
        return lifted

    def list(self, *, now: float) -> list[tuple[str, str, str, str | None, float]]:
        live = [(m["since"], (p, n, k, m["value"], float(m["until"]))) for p, n, k, m in self._all()]
        return [row for since, row in sorted(live, key=lambda r: r[0]) if row[4] > now]
