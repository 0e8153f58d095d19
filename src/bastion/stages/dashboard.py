"""The dashboard's routes: open and end a session, the summary, the page.

Each runs after identity, the containment gate, limits and `AuthorizeServer(ADMIN)`. A session is
opened with an API key only (the route's identity stage takes no token and no session), and its
opening and ending are audited as changes (`ctx.operation`); the transport turns
`ctx.session_issued` into the cookie and `ctx.session_ended` into a cleared one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bastion import dashboard
from bastion.context import RequestContext
from bastion.sessions import SessionAuthority
from bastion.stages.admin import _json_object


class OpenSession:
    def __init__(self, sessions: SessionAuthority) -> None:
        self._sessions = sessions

    async def __call__(self, ctx: RequestContext) -> None:
        await _json_object(ctx, set())
        principal = ctx.principal
        assert principal is not None and principal.via == "key", "the route's identity takes keys only"
        issued = self._sessions.issue(principal.key_id, now=ctx.now)
        ctx.session_issued = issued
        ctx.operation = (f"key:{principal.key_id}", "session_opened")
        ctx.result = {
            "key_id": principal.key_id,
            "csrf_token": issued.session.csrf_token,
            "expires_in": issued.max_age,
            "expires_at": issued.session.expires_at,
        }


class CloseSession:
    def __init__(self, sessions: SessionAuthority) -> None:
        self._sessions = sessions

    async def __call__(self, ctx: RequestContext) -> None:
        await _json_object(ctx, set())
        principal = ctx.principal
        assert principal is not None
        if ctx.session_open is not None:
            self._sessions.end(ctx.session_open, now=ctx.now)
        ctx.session_ended = True
        ctx.operation = (f"key:{principal.key_id}", "session_closed")
        ctx.result = {"ended": True}


class Summarize:
    """`build` gathers the summary (bastion.dashboard.summary.build_summary over the service's parts)."""

    def __init__(self, build: Callable[[float], Any]) -> None:
        self._build = build

    async def __call__(self, ctx: RequestContext) -> None:
        ctx.result = await self._build(ctx.now)


class ServeDashboard:
    async def __call__(self, ctx: RequestContext) -> None:
        session = ctx.session_open
        ctx.result_text = dashboard.page(session.csrf_token if session is not None else "")
