"""Admin routes: incidents and the release of what query auditing contained (`/v2/admin/...`).

Each runs after `AuthorizeServer(ADMIN)`; each change is recorded in the incident's timeline (actor:
the admin's principal) and, as every request, in the audit log, with `ctx.operation` saying what
changed. Bodies are small JSON objects; a note is an operator's text, kept in the incident only.
"""

from __future__ import annotations

from bastion.containment import MeasureRecords
from bastion.context import RequestContext
from bastion.errors import BadRequest, ErrorCode, NotFound
from bastion.incidents import IncidentRecords, IncidentState
from bastion.isolation import IsolationRecords
from bastion.keys import KeyRecords
from bastion.protocol import parse_json
from bastion.tokens import TokenRevocations

_MAX_BODY = 8 * 1024
MAX_BEFORE = 1e12  # Unix seconds: the OpenAPI document's bound on a revoke-before time


async def _json_object(ctx: RequestContext, allowed: set[str]) -> dict[str, object]:
    body = await ctx.read_body(_MAX_BODY)
    doc = parse_json(body) if body else {}  # no body is none; whitespace alone is not JSON
    if not isinstance(doc, dict) or set(doc) - allowed:
        raise BadRequest(
            f"the body must be a JSON object with only {sorted(allowed)}", code=ErrorCode.MALFORMED_REQUEST
        )
    return doc


def _incident_id(ctx: RequestContext) -> int:
    assert ctx.resource_id is not None, "the route's pattern holds the id"
    return int(ctx.resource_id)


def _actor(ctx: RequestContext) -> str:
    assert ctx.principal is not None
    return ctx.principal.id


class ListIncidents:
    def __init__(self, incidents: IncidentRecords) -> None:
        self._incidents = incidents

    async def __call__(self, ctx: RequestContext) -> None:
        listed = self._incidents.list(limit=200)
        ctx.result = {"incidents": [i.as_dict() for i in listed], "counts": self._incidents.counts()}


class ShowIncident:
    def __init__(self, incidents: IncidentRecords) -> None:
        self._incidents = incidents

    async def __call__(self, ctx: RequestContext) -> None:
        ctx.result = self._incidents.get(_incident_id(ctx)).as_dict()


class TransitionIncident:
    """`{"state": "investigating", "note": "..."}`: acknowledge (investigating), resolve
    (remediated), close. 400 `invalid_transition` for a move the lifecycle does not allow."""

    def __init__(self, incidents: IncidentRecords) -> None:
        self._incidents = incidents

    async def __call__(self, ctx: RequestContext) -> None:
        doc = await _json_object(ctx, {"state", "note"})
        state, note = doc.get("state"), doc.get("note")
        if not isinstance(state, str) or state not in {s.value for s in IncidentState}:
            raise BadRequest(
                f"state: one of {', '.join(s.value for s in IncidentState)}", code=ErrorCode.MALFORMED_REQUEST
            )
        if note is not None and not isinstance(note, str):
            raise BadRequest("note: a string", code=ErrorCode.MALFORMED_REQUEST)
        incident_id = _incident_id(ctx)
        incident = self._incidents.transition(
            incident_id, IncidentState(state), actor=_actor(ctx), now=ctx.now, note=note
        )
        ctx.operation = (f"incident:{incident_id}", f"state={state}")
        ctx.result = incident.as_dict()


class NoteIncident:
    def __init__(self, incidents: IncidentRecords) -> None:
        self._incidents = incidents

    async def __call__(self, ctx: RequestContext) -> None:
        doc = await _json_object(ctx, {"note"})
        note = doc.get("note")
        if not isinstance(note, str):
            raise BadRequest("note: a string", code=ErrorCode.MALFORMED_REQUEST)
        incident_id = _incident_id(ctx)
        incident = self._incidents.note(incident_id, note, actor=_actor(ctx), now=ctx.now)
        ctx.operation = (f"incident:{incident_id}", "note")
        ctx.result = incident.as_dict()


class ReleaseKey:
    """Lift what query auditing put on a key: its quarantine and every timed containment step. The
    release goes into the timeline of each of the key's incidents not closed (who, when, what)."""

    def __init__(self, keys: KeyRecords, measures: MeasureRecords, incidents: IncidentRecords) -> None:
        self._keys = keys
        self._measures = measures
        self._incidents = incidents

    async def __call__(self, ctx: RequestContext) -> None:
        await _json_object(ctx, set())
        key_id = ctx.resource_id
        assert key_id is not None
        # A service identity's principal id is its own (cert:<name>); a key's is key:<id>.
        principal = key_id if key_id.startswith("cert:") else f"key:{key_id}"
        released = self._keys.release(key_id)
        lifted = self._measures.release(principal)
        if not released and not lifted:
            raise NotFound(
                f"key {key_id} is neither quarantined nor contained (or does not exist)",
                code=ErrorCode.NOT_FOUND,
            )
        what = ("quarantine lifted" if released else "") + (
            f"{', ' if released else ''}{lifted} timed step(s) lifted" if lifted else ""
        )
        incidents = self._incidents.record_release(
            principal, actor=_actor(ctx), now=ctx.now, note=f"key released: {what} (request {ctx.request_id})"
        )
        ctx.operation = (principal, "released")
        ctx.result = {"key_id": key_id, "released": True, "incidents": list(incidents)}


class ReleaseModel:
    """Serve an isolated model again; the release goes into its model-wide incidents' timelines."""

    def __init__(self, isolation: IsolationRecords, incidents: IncidentRecords) -> None:
        self._isolation = isolation
        self._incidents = incidents

    async def __call__(self, ctx: RequestContext) -> None:
        await _json_object(ctx, set())
        name = ctx.model_name
        assert name is not None
        if not self._isolation.release(name):
            raise NotFound(f"model {name!r} is not isolated", code=ErrorCode.NOT_FOUND)
        incidents = self._incidents.record_release(
            f"model:{name}", actor=_actor(ctx), now=ctx.now, note=f"model released (request {ctx.request_id})"
        )
        ctx.operation = (f"model:{name}", "released")
        ctx.result = {"model": name, "released": True, "incidents": list(incidents)}


class RevokeToken:
    """Put one token on the deny list by its jti (the token response's `jti`; the audit records'
    `token`): refused by every replica within 0.25 s. Idempotent; whether such a token was ever
    issued is not known (tokens are not stored), so an unknown jti is accepted too."""

    def __init__(self, revocations: TokenRevocations) -> None:
        self._revocations = revocations

    async def __call__(self, ctx: RequestContext) -> None:
        await _json_object(ctx, set())
        jti = ctx.resource_id
        assert jti is not None, "the route's pattern holds the jti"
        entry = self._revocations.revoke(jti, now=ctx.now)
        ctx.operation = (f"token:{jti}", "revoked")
        ctx.result = {"jti": jti, "revoked": True, "until": entry.until}


class RevokeKeyTokens:
    """`{"before": <Unix seconds>}` (default, and at most: now): every token of the key issued before
    then is refused; the key itself, and tokens it mints afterwards, still work."""

    def __init__(self, revocations: TokenRevocations) -> None:
        self._revocations = revocations

    async def __call__(self, ctx: RequestContext) -> None:
        doc = await _json_object(ctx, {"before"})
        before = doc.get("before", ctx.now)
        if isinstance(before, bool) or not isinstance(before, int | float) or not 0 <= before <= MAX_BEFORE:
            raise BadRequest("before: Unix seconds", code=ErrorCode.MALFORMED_REQUEST)
        key_id = ctx.resource_id
        assert key_id is not None
        if key_id.startswith("cert:"):  # the path also names service identities (for their release)
            raise NotFound(f"{key_id} is a service identity: it mints no token", code=ErrorCode.NOT_FOUND)
        entry = self._revocations.revoke_before(key_id, before=float(before), now=ctx.now)
        ctx.operation = (f"key:{key_id}", f"tokens_revoked_before={entry.before:.0f}")
        ctx.result = {"key_id": key_id, "before": entry.before, "until": entry.until}
