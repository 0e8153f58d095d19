"""Defense stages. Each is one object with one async method: `await stage(ctx)` returns or raises.

The order in which they run is set in one place, `bastion.service.build_pipelines`.
"""

from __future__ import annotations

from typing import Protocol

from bastion.context import RequestContext


class Stage(Protocol):
    async def __call__(self, ctx: RequestContext) -> None: ...
