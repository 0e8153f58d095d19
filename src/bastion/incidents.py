"""Incidents as a lifecycle: open -> contained -> investigating -> remediated -> closed.

Query auditing opens an incident when it flags a principal (model extraction, prompt extraction)
or isolates a model; operators move it along with notes (`bastion incidents ...`, or the admin API
under `/v2/admin/incidents`). Every incident keeps who changed what and when, and its evidence:
signals, counts, the model's digest, the request id of the audit record that opened it (never a
payload, a prompt or an answer). A small SQLite table beside the keys, shared by every worker and
the CLI, like `isolation.py`.

The lifecycle follows the incident-handling phases of NIST SP 800-61r2 (containment, eradication
and recovery, post-incident activity): states only move forward, except that a remediated incident
may be reopened for investigation.

`IncidentRecords` is the interface; `IncidentStore` is the SQLite tables (the embedded default),
`SharedIncidentStore` one record per incident (with its events) in Redis or PostgreSQL
(`bastion.records`), so an incident opened on one replica is seen on all. Incidents are not
cached: every read goes to the store.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from bastion.errors import BadRequest, ErrorCode, NotFound
from bastion.files import open_shared_sqlite
from bastion.records import Records, update


class IncidentState(StrEnum):
    OPEN = "open"  # recorded; nothing contained it (extraction_watch = "alert", the ladder's "record")
    CONTAINED = "contained"  # the key quarantined or the model isolated
    INVESTIGATING = "investigating"  # acknowledged by an operator
    REMEDIATED = "remediated"  # the cause is dealt with (key released or revoked, prompt changed...)
    CLOSED = "closed"  # reviewed; archived


# Forward only; a remediated incident may go back to investigating (the fix did not hold).
_NEXT: dict[IncidentState, frozenset[IncidentState]] = {
    IncidentState.OPEN: frozenset(
        {IncidentState.CONTAINED, IncidentState.INVESTIGATING, IncidentState.REMEDIATED, IncidentState.CLOSED}
    ),
    IncidentState.CONTAINED: frozenset(
        {IncidentState.INVESTIGATING, IncidentState.REMEDIATED, IncidentState.CLOSED}
    ),
    IncidentState.INVESTIGATING: frozenset({IncidentState.REMEDIATED, IncidentState.CLOSED}),
    IncidentState.REMEDIATED: frozenset({IncidentState.INVESTIGATING, IncidentState.CLOSED}),
    IncidentState.CLOSED: frozenset(),
}

_MAX_NOTE = 2000  # characters of an operator's note

_SCHEMA = """
CREATE TABLE IF NOT EXISTS incidents (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    opened_at   REAL NOT NULL,
    kind        TEXT NOT NULL,
    model       TEXT NOT NULL,
    principal   TEXT,
    action      TEXT NOT NULL,
    detail      TEXT NOT NULL,
    evidence    TEXT NOT NULL,
    request_id  TEXT,
    state       TEXT NOT NULL,
    updated_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS incident_events (
    incident_id INTEGER NOT NULL REFERENCES incidents(id),
    at          REAL NOT NULL,
    actor       TEXT NOT NULL,
    action      TEXT NOT NULL,
    from_state  TEXT,
    to_state    TEXT,
    note        TEXT
);
CREATE INDEX IF NOT EXISTS incident_events_by_incident ON incident_events (incident_id);
"""


@dataclass(frozen=True, slots=True)
class IncidentEvent:
    at: float
    actor: str  # "bastion" (the server), "key:<id>" (an admin over the API), "cli:<user>"
    action: str  # opened, transition, note
    from_state: str | None
    to_state: str | None
    note: str | None


@dataclass(frozen=True, slots=True)
class Incident:
    id: int
    opened_at: float
    kind: str  # extraction_suspected, prompt_extraction_suspected, several_principals
    model: str
    principal: str | None  # "key:<id>"; None for a model-wide incident (isolation)
    action: str  # what containment did: quarantine, alert, isolate_model
    detail: str
    evidence: dict[str, Any]
    request_id: str | None  # the audit record of the request that tipped it
    state: IncidentState
    updated_at: float
    events: tuple[IncidentEvent, ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "opened_at": self.opened_at,
            "kind": self.kind,
            "model": self.model,
            "principal": self.principal,
            "action": self.action,
            "detail": self.detail,
            "evidence": self.evidence,
            "request_id": self.request_id,
            "state": self.state.value,
            "updated_at": self.updated_at,
            "events": [
                {
                    "at": e.at,
                    "actor": e.actor,
                    "action": e.action,
                    "from": e.from_state,
                    "to": e.to_state,
                    "note": e.note,
                }
                for e in self.events
            ],
        }


class IncidentRecords(Protocol):
    """Incidents and their lifecycle. Every method may raise `StateUnavailable` (503)."""

    def open(
        self,
        *,
        kind: str,
        model: str,
        principal: str | None,
        action: str,
        detail: str,
        evidence: dict[str, Any],
        request_id: str | None,
        now: float,
    ) -> int:
        """Record a new incident; contained at once when containment acted. Returns its id."""
        ...

    def get(self, incident_id: int) -> Incident:
        """Raises NotFound (404 `incident_not_found`)."""
        ...

    def list(self, *, state: IncidentState | None = None, limit: int = 100) -> list[Incident]:
        """Newest first, without their events."""
        ...

    def count_for(self, principal: str, model: str) -> int:
        """Incidents this principal has had on this model (the containment ladder's rung)."""
        ...

    def counts(self) -> dict[str, int]:
        """Incidents per state (every state, zeros included)."""
        ...

    def transition(
        self, incident_id: int, to: IncidentState, *, actor: str, now: float, note: str | None = None
    ) -> Incident:
        """Raises NotFound, or BadRequest (`invalid_transition`) for a move the lifecycle forbids."""
        ...

    def note(self, incident_id: int, text: str, *, actor: str, now: float) -> Incident: ...

    def record_release(self, released: str, *, actor: str, now: float, note: str) -> tuple[int, ...]:
        """A release in the timeline of every incident it ends, not closed: `released` is a principal
        (`key:<id>`, `cert:<name>`: its incidents) or `model:<name>` (that model's model-wide
        incidents). The states do not move (the operator moves them). Returns the incidents' ids."""
        ...

    def close(self) -> None: ...


class IncidentStore:
    def __init__(self, path: Path) -> None:
        self._conn = open_shared_sqlite(path, _SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._conn.close()

    def open(
        self,
        *,
        kind: str,
        model: str,
        principal: str | None,
        action: str,
        detail: str,
        evidence: dict[str, Any],
        request_id: str | None,
        now: float,
    ) -> int:
        """Record a new incident; contained at once when containment acted. Returns its id."""
        state = _first_state(action)
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                cur = self._conn.execute(
                    "INSERT INTO incidents (opened_at, kind, model, principal, action, detail, evidence, "
                    "request_id, state, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        now,
                        kind,
                        model,
                        principal,
                        action,
                        detail,
                        json.dumps(evidence),
                        request_id,
                        state,
                        now,
                    ),
                )
                incident_id = int(cur.lastrowid or 0)
                self._event(incident_id, now, "bastion", "opened", None, state, None)
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return incident_id

    def get(self, incident_id: int) -> Incident:
        """Raises NotFound (404 `incident_not_found`)."""
        with self._lock:
            row = self._conn.execute(
                f"SELECT {_COLUMNS} FROM incidents WHERE id = ?", (incident_id,)
            ).fetchone()
            if row is None:
                raise NotFound(f"no incident {incident_id}", code=ErrorCode.INCIDENT_NOT_FOUND)
            events = self._conn.execute(
                "SELECT at, actor, action, from_state, to_state, note FROM incident_events "
                "WHERE incident_id = ? ORDER BY rowid",
                (incident_id,),
            ).fetchall()
        return _incident(row, tuple(IncidentEvent(*e) for e in events))

    def list(self, *, state: IncidentState | None = None, limit: int = 100) -> list[Incident]:
        """Newest first, without their events."""
        with self._lock:
            if state is None:
                rows = self._conn.execute(
                    f"SELECT {_COLUMNS} FROM incidents ORDER BY id DESC LIMIT ?", (limit,)
                ).fetchall()
            else:
                rows = self._conn.execute(
                    f"SELECT {_COLUMNS} FROM incidents WHERE state = ? ORDER BY id DESC LIMIT ?",
                    (state.value, limit),
                ).fetchall()
        return [_incident(r, ()) for r in rows]

    def count_for(self, principal: str, model: str) -> int:
        """Incidents this principal has had on this model (the containment ladder's rung)."""
        with self._lock:
            (n,) = self._conn.execute(
                "SELECT COUNT(*) FROM incidents WHERE principal = ? AND model = ?", (principal, model)
            ).fetchone()
        return int(n)

    def counts(self) -> dict[str, int]:
        """Incidents per state (every state, zeros included)."""
        with self._lock:
            rows = self._conn.execute("SELECT state, COUNT(*) FROM incidents GROUP BY state").fetchall()
        found = dict(rows)
        return {s.value: int(found.get(s.value, 0)) for s in IncidentState}

    def transition(
        self, incident_id: int, to: IncidentState, *, actor: str, now: float, note: str | None = None
    ) -> Incident:
        """Move an incident to `to`. Raises NotFound, or BadRequest (409-like, 400
        `invalid_transition`) for a move the lifecycle does not allow."""
        note = _checked_note(note)
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                row = self._conn.execute(
                    "SELECT state FROM incidents WHERE id = ?", (incident_id,)
                ).fetchone()
                if row is None:
                    raise NotFound(f"no incident {incident_id}", code=ErrorCode.INCIDENT_NOT_FOUND)
                current = IncidentState(row[0])
                if to not in _NEXT[current]:
                    raise BadRequest(
                        f"incident {incident_id} is {current.value}: it cannot become {to.value}",
                        code=ErrorCode.INVALID_TRANSITION,
                    )
                self._conn.execute(
                    "UPDATE incidents SET state = ?, updated_at = ? WHERE id = ?",
                    (to.value, now, incident_id),
                )
                self._event(incident_id, now, actor, "transition", current, to, note)
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return self.get(incident_id)

    def note(self, incident_id: int, text: str, *, actor: str, now: float) -> Incident:
        checked = _checked_note(text)
        if not checked:
            raise BadRequest("an empty note", code=ErrorCode.MALFORMED_REQUEST)
        with self._lock:
            row = self._conn.execute("SELECT state FROM incidents WHERE id = ?", (incident_id,)).fetchone()
            if row is None:
                raise NotFound(f"no incident {incident_id}", code=ErrorCode.INCIDENT_NOT_FOUND)
            if row[0] == IncidentState.CLOSED:  # the archived record does not change after closure
                raise BadRequest(f"incident {incident_id} is closed", code=ErrorCode.INVALID_TRANSITION)
            self._conn.execute("UPDATE incidents SET updated_at = ? WHERE id = ?", (now, incident_id))
            self._event(incident_id, now, actor, "note", None, None, checked)
        return self.get(incident_id)

    def record_release(self, released: str, *, actor: str, now: float, note: str) -> tuple[int, ...]:
        model = _released_model(released)
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                if model is None:
                    rows = self._conn.execute(
                        "SELECT id FROM incidents WHERE principal = ? AND state != ? ORDER BY id",
                        (released, IncidentState.CLOSED.value),
                    ).fetchall()
                else:
                    rows = self._conn.execute(
                        "SELECT id FROM incidents WHERE principal IS NULL AND model = ? AND state != ? ORDER BY id",
                        (model, IncidentState.CLOSED.value),
                    ).fetchall()
                ids = [int(r[0]) for r in rows]
                for incident_id in ids:
                    self._conn.execute("UPDATE incidents SET updated_at = ? WHERE id = ?", (now, incident_id))
                    self._event(incident_id, now, actor, "released", None, None, note)
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return tuple(ids)

    def _event(
        self,
        incident_id: int,
        now: float,
        actor: str,
        action: str,
        from_state: IncidentState | None,
        to_state: IncidentState | None,
        note: str | None,
    ) -> None:
        self._conn.execute(
            "INSERT INTO incident_events VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                incident_id,
                now,
                actor,
                action,
                from_state.value if from_state else None,
                to_state.value if to_state else None,
                note,
            ),
        )


_INCIDENTS = "incidents"  # the shared collection: str(id) -> Incident.as_dict()


class SharedIncidentStore:
    """Incidents in Redis or PostgreSQL: one record per incident, its events inside it; ids from
    the store's sequence; a transition or note is a compare-and-set of the record."""

    def __init__(self, records: Records) -> None:
        self._records = records

    def close(self) -> None:
        self._records.close()

    def open(
        self,
        *,
        kind: str,
        model: str,
        principal: str | None,
        action: str,
        detail: str,
        evidence: dict[str, Any],
        request_id: str | None,
        now: float,
    ) -> int:
        state = _first_state(action)
        incident_id = self._records.next_id(_INCIDENTS)
        opened = IncidentEvent(now, "bastion", "opened", None, state.value, None)
        incident = Incident(
            incident_id, now, kind, model, principal, action, detail, evidence, request_id, state, now, (opened,)
        )
        self._records.swap(_INCIDENTS, str(incident_id), None, json.dumps(incident.as_dict(), sort_keys=True))
        return incident_id

    def get(self, incident_id: int) -> Incident:
        text = self._records.get(_INCIDENTS, str(incident_id))
        if text is None:
            raise NotFound(f"no incident {incident_id}", code=ErrorCode.INCIDENT_NOT_FOUND)
        return _from_dict(json.loads(text))

    def _all(self) -> list[Incident]:
        return [_from_dict(json.loads(v)) for v in self._records.items(_INCIDENTS).values()]

    def list(self, *, state: IncidentState | None = None, limit: int = 100) -> list[Incident]:
        found = sorted(
            (i for i in self._all() if state is None or i.state == state), key=lambda i: i.id, reverse=True
        )
        return [replace(i, events=()) for i in found[:limit]]

    def count_for(self, principal: str, model: str) -> int:
        return sum(1 for i in self._all() if i.principal == principal and i.model == model)

    def counts(self) -> dict[str, int]:
        found = [i.state for i in self._all()]
        return {s.value: found.count(s) for s in IncidentState}

    def _change(self, incident_id: int, change: Any) -> Incident:
        def checked(current: dict[str, Any] | None) -> dict[str, Any]:
            if current is None:
                raise NotFound(f"no incident {incident_id}", code=ErrorCode.INCIDENT_NOT_FOUND)
            return dict(change(_from_dict(current)).as_dict())

        update(self._records, _INCIDENTS, str(incident_id), checked)
        return self.get(incident_id)

    def transition(
        self, incident_id: int, to: IncidentState, *, actor: str, now: float, note: str | None = None
    ) -> Incident:
        note = _checked_note(note)

        def change(incident: Incident) -> Incident:
            if to not in _NEXT[incident.state]:
                raise BadRequest(
                    f"incident {incident_id} is {incident.state.value}: it cannot become {to.value}",
                    code=ErrorCode.INVALID_TRANSITION,
                )
            event = IncidentEvent(now, actor, "transition", incident.state.value, to.value, note)
            return replace(incident, state=to, updated_at=now, events=(*incident.events, event))

        return self._change(incident_id, change)

    def note(self, incident_id: int, text: str, *, actor: str, now: float) -> Incident:
        checked = _checked_note(text)
        if not checked:
            raise BadRequest("an empty note", code=ErrorCode.MALFORMED_REQUEST)

        def change(incident: Incident) -> Incident:
            if incident.state == IncidentState.CLOSED:  # the archived record does not change after closure
                raise BadRequest(f"incident {incident_id} is closed", code=ErrorCode.INVALID_TRANSITION)
            event = IncidentEvent(now, actor, "note", None, None, checked)
            return replace(incident, updated_at=now, events=(*incident.events, event))

        return self._change(incident_id, change)

    def record_release(self, released: str, *, actor: str, now: float, note: str) -> tuple[int, ...]:
        model = _released_model(released)
        found = [
            i.id
            for i in self._all()
            if i.state != IncidentState.CLOSED
            and (i.principal == released if model is None else i.principal is None and i.model == model)
        ]
        ids = []
        for incident_id in sorted(found):

            def change(incident: Incident) -> Incident:
                if incident.state == IncidentState.CLOSED:  # closed meanwhile: left as archived
                    return incident
                event = IncidentEvent(now, actor, "released", None, None, note)
                return replace(incident, updated_at=now, events=(*incident.events, event))

            if self._change(incident_id, change).events[-1].action == "released":
                ids.append(incident_id)
        return tuple(ids)


def _first_state(action: str) -> IncidentState:
    """Contained when containment acted (throttle, degrade, reroute, quarantine, isolation); open when it
    only recorded (`record`, the ladder's step and what extraction_watch = "alert" maps to; `alert`)."""
    return IncidentState.OPEN if action in ("alert", "record") else IncidentState.CONTAINED


def _released_model(released: str) -> str | None:
    """`model:<name>` -> the name; a principal -> None."""
    return released.removeprefix("model:") if released.startswith("model:") else None


def _from_dict(d: dict[str, Any]) -> Incident:
    """The inverse of `Incident.as_dict`."""
    return Incident(
        id=int(d["id"]),
        opened_at=d["opened_at"],
        kind=d["kind"],
        model=d["model"],
        principal=d["principal"],
        action=d["action"],
        detail=d["detail"],
        evidence=d["evidence"],
        request_id=d["request_id"],
        state=IncidentState(d["state"]),
        updated_at=d["updated_at"],
        events=tuple(
            IncidentEvent(e["at"], e["actor"], e["action"], e["from"], e["to"], e["note"]) for e in d["events"]
        ),
    )


_COLUMNS = "id, opened_at, kind, model, principal, action, detail, evidence, request_id, state, updated_at"


def _incident(row: tuple[Any, ...], events: tuple[IncidentEvent, ...]) -> Incident:
    return Incident(
        id=row[0],
        opened_at=row[1],
        kind=row[2],
        model=row[3],
        principal=row[4],
        action=row[5],
        detail=row[6],
        evidence=json.loads(row[7]),
        request_id=row[8],
        state=IncidentState(row[9]),
        updated_at=row[10],
        events=events,
    )


def _checked_note(note: str | None) -> str | None:
    if note is None:
        return None
    note = "".join(ch if ch.isprintable() or ch == "\n" else "?" for ch in note.strip())
    if len(note) > _MAX_NOTE:
        raise BadRequest(f"a note longer than {_MAX_NOTE} characters", code=ErrorCode.MALFORMED_REQUEST)
    return note


def export_markdown(
    incident: Incident, audit_seqs: dict[str, int] | None = None, changes: list[dict[str, Any]] | None = None
) -> str:
    """A post-incident review's record: the lifecycle, the evidence (signals, counts, digests) and
    the audit log's sequence numbers, never a payload. `audit_seqs`: request id -> audit `seq`;
    `changes`: the audit records of the operators' changes (AuditSource.find_changes), None when the
    log could not be read."""
    seqs = audit_seqs or {}
    lines = [
        f"# Incident {incident.id}: {incident.kind} on {incident.model}",
        "",
        f"- state: **{incident.state.value}**",
        f"- opened: {_iso(incident.opened_at)}; last change: {_iso(incident.updated_at)}",
        f"- principal: {incident.principal or '(model-wide)'}",
        f"- containment: {incident.action}",
        f"- detail: {incident.detail}",
    ]
    if incident.request_id:
        seq = seqs.get(incident.request_id)
        where = f"audit record seq {seq}" if seq is not None else "audit record"
        lines.append(f"- tipped by request `{incident.request_id}` ({where})")
    lines += ["", "## Evidence", "", "| signal | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(incident.evidence.items())]
    lines += ["", "## Timeline", "", "| when | who | what | note |", "|---|---|---|---|"]
    for e in incident.events:
        what = e.action if e.to_state is None else f"{e.action}: {e.from_state or '-'} -> {e.to_state}"
        note = _markdown_cell(e.note or "")
        lines.append(f"| {_iso(e.at)} | {e.actor} | {what} | {note} |")
    if changes is not None or audit_seqs is not None:
        lines += ["", "## Audit records of the changes", ""]
        if changes is None:
            lines.append("(the audit log could not be read)")
        elif not changes:
            lines.append("(none)")
        else:
            lines += ["| seq | when | who | route | change | status |", "|---|---|---|---|---|---|"]
            for c in changes:
                cells = (c.get("principal"), c.get("route"), c.get("change"), c.get("status"))
                lines.append(
                    f"| {c['seq']} | {_iso(float(c.get('ts') or 0))} | "
                    + " | ".join(_markdown_cell(str(v if v is not None else "-")) for v in cells)
                    + " |"
                )
    return "\n".join(lines) + "\n"


def _markdown_cell(text: str) -> str:
    """An operator's text as one table cell that renders as text: HTML escaped (a renderer with HTML
    on must not run a note), backslashes before pipes, one line."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _iso(ts: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
