"""Incidents as a lifecycle: the store, the admin routes through the core, and the CLI."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bastion.config import load_config
from bastion.context import RequestContext
from bastion.demo import build_demo
from bastion.errors import BadRequest, NotFound
from bastion.incidents import IncidentEvent, IncidentState, IncidentStore, export_markdown
from bastion.routes import Route
from bastion.service import Bastion, Outcome
from tests.helpers import core_context


def _open(store: IncidentStore, action: str = "quarantine") -> int:
    return store.open(
        kind="extraction_suspected",
        model="breast-cancer",
        principal="key:0123456789abcdef",
        action=action,
        detail="near_duplicates: 40 of 128",
        evidence={"signal": "near_duplicates", "digest": "sha256:ab"},
        request_id="r1",
        now=1000.0,
    )


def test_the_lifecycle_moves_forward_and_keeps_who_and_when(tmp_path: Path) -> None:
    store = IncidentStore(tmp_path / "incidents.db")
    contained, recorded = _open(store), _open(store, action="alert")
    assert store.get(contained).state is IncidentState.CONTAINED  # containment acted
    assert store.get(recorded).state is IncidentState.OPEN  # only recorded ("alert")
    store.transition(contained, IncidentState.INVESTIGATING, actor="key:a", now=1001.0, note="looking")
    store.note(contained, "the key belongs to a partner's test harness", actor="key:a", now=1002.0)
    store.transition(contained, IncidentState.REMEDIATED, actor="cli:ops", now=1003.0)
    store.transition(contained, IncidentState.INVESTIGATING, actor="cli:ops", now=1004.0)  # reopened
    done = store.transition(contained, IncidentState.CLOSED, actor="cli:ops", now=1005.0)
    assert [(e.actor, e.action, e.to_state) for e in done.events] == [
        ("bastion", "opened", "contained"),
        ("key:a", "transition", "investigating"),
        ("key:a", "note", None),
        ("cli:ops", "transition", "remediated"),
        ("cli:ops", "transition", "investigating"),
        ("cli:ops", "transition", "closed"),
    ]
    assert store.counts() == {
        "open": 1,
        "contained": 0,
        "investigating": 0,
        "remediated": 0,
        "closed": 1,
    }
    with pytest.raises(BadRequest):  # nor does its record change after closure
        store.note(contained, "late", actor="x", now=1006.0)
    for to in IncidentState:  # closed is final
        with pytest.raises(BadRequest) as refused:
            store.transition(contained, to, actor="x", now=1006.0)
        assert refused.value.code == "invalid_transition"
    store.transition(recorded, IncidentState.INVESTIGATING, actor="x", now=1)
    with pytest.raises(BadRequest):  # never back to contained from investigating
        store.transition(recorded, IncidentState.CONTAINED, actor="x", now=2)
    with pytest.raises(NotFound):
        store.get(999)
    with pytest.raises(BadRequest):
        store.note(recorded, "x" * 2001, actor="x", now=3)
    store.close()


def test_a_release_goes_into_the_timeline_of_the_incidents_it_ends(tmp_path: Path) -> None:
    store = IncidentStore(tmp_path / "incidents.db")
    first, second = _open(store), _open(store)
    model_wide = store.open(
        kind="several_principals",
        model="breast-cancer",
        principal=None,
        action="isolate_model",
        detail="3 principals flagged",
        evidence={"signal": "several_principals"},
        request_id="r2",
        now=1000.0,
    )
    store.transition(first, IncidentState.CLOSED, actor="cli:op", now=1001.0)
    assert store.record_release(
        "key:0123456789abcdef", actor="key:a", now=1002.0, note="released (request r9)"
    ) == (second,)
    assert store.get(second).events[-1] == IncidentEvent(
        1002.0, "key:a", "released", None, None, "released (request r9)"
    )
    assert store.get(second).state == IncidentState.CONTAINED  # the operator moves it, not the release
    assert store.get(first).events[-1].action == "transition"  # closed: archived as it was
    assert store.record_release("model:breast-cancer", actor="cli:op", now=1003.0, note="m") == (model_wide,)
    assert "| released | released (request r9) |" in export_markdown(store.get(second))
    store.close()


def test_the_export_carries_evidence_and_the_audit_seq_and_escapes_notes(tmp_path: Path) -> None:
    store = IncidentStore(tmp_path / "incidents.db")
    incident_id = _open(store)
    store.note(incident_id, "a | pipe\nand a new line", actor="cli:ops", now=1001.0)
    text = export_markdown(store.get(incident_id), {"r1": 42})
    assert "audit record seq 42" in text and "| signal | near_duplicates |" in text
    assert "| a \\| pipe and a new line |" in text  # a note cannot break the table
    store.note(incident_id, "x\\|y <script>alert(1)</script>", actor="cli:ops", now=1002.0)
    text = export_markdown(store.get(incident_id))
    assert "| x\\\\\\|y &lt;script&gt;alert(1)&lt;/script&gt; |" in text  # nor run in a renderer
    store.close()


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Bastion]:
    demo = build_demo(tmp_path / "demo", llm=False)
    s = Bastion(load_config(demo.config_path), config_path=demo.config_path)
    yield s
    s.close()


def _ctx(route: Route, credentials: str, body: dict[str, Any] | bytes | None = None, **kw: Any) -> RequestContext:
    return core_context(route, credentials, body, **kw)


def test_admin_routes_move_an_incident_release_the_key_and_audit_each_step(service: Bastion) -> None:
    thief = service.keys.create(name="thief", roles=["analyst"], now=time.time())
    service.keys.quarantine(thief.record.key_id, now=time.time())
    incident_id = service.incidents.open(
        kind="extraction_suspected",
        model="breast-cancer",
        principal=f"key:{thief.record.key_id}",
        action="quarantine",
        detail="d",
        evidence={},
        request_id=None,
        now=time.time(),
    )
    admin = f"Bearer {service.keys.create(name='a', roles=['admin'], now=time.time()).secret}"
    analyst = f"Bearer {service.keys.create(name='b', roles=['analyst'], now=time.time()).secret}"
    iid = str(incident_id)

    async def calls(s: Bastion) -> list[Outcome]:
        await s.startup()
        try:
            return [
                # A non-admin key can neither read nor act.
                await s.handle(Route.INCIDENTS, _ctx(Route.INCIDENTS, analyst)),
                await s.handle(
                    Route.INCIDENT_TRANSITION,
                    _ctx(Route.INCIDENT_TRANSITION, analyst, {"state": "closed"}, resource_id=iid),
                ),
                await s.handle(
                    Route.KEY_RELEASE, _ctx(Route.KEY_RELEASE, analyst, resource_id=thief.record.key_id)
                ),
                # The admin acknowledges, notes, releases the key, resolves.
                await s.handle(Route.INCIDENTS, _ctx(Route.INCIDENTS, admin)),
                await s.handle(
                    Route.INCIDENT_TRANSITION,
                    _ctx(Route.INCIDENT_TRANSITION, admin, {"state": "investigating"}, resource_id=iid),
                ),
                await s.handle(
                    Route.INCIDENT_NOTE,
                    _ctx(Route.INCIDENT_NOTE, admin, {"note": "partner"}, resource_id=iid),
                ),
                await s.handle(
                    Route.KEY_RELEASE, _ctx(Route.KEY_RELEASE, admin, resource_id=thief.record.key_id)
                ),
                await s.handle(
                    Route.INCIDENT_TRANSITION,
                    _ctx(Route.INCIDENT_TRANSITION, admin, {"state": "remediated"}, resource_id=iid),
                ),
                await s.handle(
                    Route.INCIDENT_TRANSITION,
                    _ctx(Route.INCIDENT_TRANSITION, admin, {"state": "contained"}, resource_id=iid),
                ),
                await s.handle(Route.INCIDENT, _ctx(Route.INCIDENT, admin, resource_id="99999")),
                await s.handle(Route.METRICS, _ctx(Route.METRICS, admin)),
            ]
        finally:
            await s.aclose()

    outcomes = asyncio.run(calls(service))
    assert [o.status for o in outcomes] == [403, 403, 403, 200, 200, 200, 200, 200, 400, 404, 200]
    listed = outcomes[3].body
    assert isinstance(listed, dict) and listed["incidents"][0]["id"] == incident_id
    assert listed["counts"]["contained"] == 1
    refused = outcomes[8].body
    assert isinstance(refused, dict) and refused["code"] == "invalid_transition"

    metrics = outcomes[10].body
    assert isinstance(metrics, bytes) and b'bastion_incidents_by_state{state="remediated"} 1.0' in metrics
    with sqlite3.connect(service.paths.audit) as db:
        records = [json.loads(b) for (b,) in db.execute("SELECT body FROM records ORDER BY seq")]
    changes = [(r["route"], r["target"], r["change"]) for r in records if "change" in r]
    assert changes == [
        ("incident_transition", f"incident:{iid}", "state=investigating"),
        ("incident_note", f"incident:{iid}", "note"),
        ("key_release", f"key:{thief.record.key_id}", "released"),
        ("incident_transition", f"incident:{iid}", "state=remediated"),
    ]
    assert not any("partner" in json.dumps(r) for r in records)  # the note is in the incident, not the log
    store = IncidentStore(service.paths.incidents)
    assert [e.note for e in store.get(incident_id).events if e.action == "note"] == ["partner"]
    store.close()
    from bastion.keys import KeyStore

    keys = KeyStore(service.paths.keys)
    assert keys.get(thief.record.key_id).quarantined_at is None  # type: ignore[union-attr]
    keys.close()


def test_the_cli_lists_acknowledges_resolves_and_exports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bastion.cli import main

    demo = build_demo(tmp_path / "demo", llm=False)
    config = str(demo.config_path)
    store = IncidentStore(load_config(demo.config_path).server.state_dir / "incidents.db")
    incident_id = _open(store)
    store.close()
    assert main(["incidents", "list", "--config", config]) == 0
    assert "contained" in capsys.readouterr().out
    assert main(["incidents", "ack", "--config", config, str(incident_id), "--note", "on it"]) == 0
    assert main(["incidents", "note", "--config", config, str(incident_id), "false positive: a partner"]) == 0
    assert main(["incidents", "resolve", "--config", config, str(incident_id)]) == 0
    assert main(["incidents", "resolve", "--config", config, str(incident_id), "--close"]) == 0
    assert "closed" in capsys.readouterr().out
    # Closed is final: a clear refusal, exit 1, no traceback.
    assert main(["incidents", "ack", "--config", config, str(incident_id)]) == 1
    assert "cannot become investigating" in capsys.readouterr().err
    assert main(["incidents", "show", "--config", config, "999"]) == 1
    assert main(["incidents", "export", "--config", config, str(incident_id), "--format", "json"]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported["state"] == "closed" and [e["to"] for e in exported["events"] if e["to"]] == [
        "contained",
        "investigating",
        "remediated",
        "closed",
    ]
    assert all(e["actor"].startswith(("bastion", "cli:")) for e in exported["events"])


def test_an_incident_nothing_contained_is_open_not_contained(tmp_path: Path) -> None:
    """Red team of issue 12, second pass, F13: the ladder's `record` step (also what extraction_watch
    = "alert" maps to for classifiers) opened incidents as `contained` though nothing was contained."""
    store = IncidentStore(tmp_path / "incidents.db")
    states = {action: store.get(_open(store, action=action)).state for action in ("record", "alert", "throttle")}
    assert states == {
        "record": IncidentState.OPEN,
        "alert": IncidentState.OPEN,
        "throttle": IncidentState.CONTAINED,
    }
    store.close()


def test_a_flood_of_newer_incidents_does_not_bury_an_unresolved_one_on_the_dashboard(service: Bastion) -> None:
    """Red team of issue 12, second pass, F14: the summary took the unresolved incidents among the 50
    newest of any state, so a principal whose ladder only records (a new incident every few dozen
    probes) pushed another thief's contained incident off the dashboard."""
    now = time.time()
    buried = service.incidents.open(
        kind="extraction_suspected",
        model="breast-cancer",
        principal="key:00000000000000aa",
        action="quarantine",
        detail="the real one",
        evidence={},
        request_id=None,
        now=now,
    )
    for n in range(300):
        flooded = service.incidents.open(
            kind="extraction_suspected",
            model="breast-cancer",
            principal="key:00000000000000bb",
            action="record",
            detail=f"flood {n}",
            evidence={},
            request_id=None,
            now=now + 1 + n,
        )
        if n < 280:  # the operator closed most of them
            service.incidents.transition(flooded, IncidentState.CLOSED, actor="cli:op", now=now + 1 + n)
    admin = f"Bearer {service.keys.create(name='a', roles=['admin'], now=now).secret}"

    async def call(s: Bastion) -> Outcome:
        await s.startup()
        try:
            return await s.handle(Route.SUMMARY, _ctx(Route.SUMMARY, admin))
        finally:
            await s.aclose()

    summary = asyncio.run(call(service)).body
    assert isinstance(summary, dict)
    unresolved = summary["incidents"]["unresolved"]
    assert buried in [i["id"] for i in unresolved]
    assert len(unresolved) == 21 and summary["incidents"]["unresolved_total"] == 21


@pytest.mark.parametrize("body", [b" ", b"\n\t ", b"{} x", b"null", b"[]"])
def test_an_admin_body_that_is_not_a_json_object_is_refused(service: Bastion, body: bytes) -> None:
    # The body is optional (none is none), but whitespace or other text is not JSON: 400, nothing done.
    admin = f"Bearer {service.keys.create(name='a', roles=['admin'], now=time.time()).secret}"

    async def calls(s: Bastion) -> list[Outcome]:
        await s.startup()
        try:
            return [
                await s.handle(Route.SESSION, _ctx(Route.SESSION, admin, body)),
                await s.handle(Route.SESSION, _ctx(Route.SESSION, admin, b"")),
            ]
        finally:
            await s.aclose()

    refused, opened = asyncio.run(calls(service))
    assert refused.status == 400 and isinstance(refused.body, dict), refused.body
    assert refused.body["code"] in ("malformed_json", "malformed_request"), refused.body
    assert opened.status == 200, opened.body
