"""Load shedding by requests in flight, never by connections, never for health probes.

An idle or slow connection costs the server a file descriptor, which the front end bounds and
times out; only a request the application is working on costs it work. So the count is of
requests inside the application, less those waiting for their client's body, and the two probes
(the public routes: /v2/health/live and /v2/health/ready, exactly) are neither counted nor
refused: a load balancer must see a busy replica as alive. Any other path, /v2/health/x or
/v2/health/../models/m included, is counted (a prefix match let those run the whole pipeline
uncounted).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from bastion.errors import Overloaded
from bastion.routes import ROUTES

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

RETRY_AFTER_SECONDS = 1
# Exact paths, from the route table: the routes that answer without credentials.
EXEMPT_PATHS = frozenset(spec.path for spec in ROUTES if spec.public)


class LoadShedder:
    """ASGI middleware: over `max_in_flight` requests in `app`, answer 503 `overloaded` with Retry-After."""

    def __init__(self, app: ASGIApp, *, max_in_flight: int) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.app = app
        self.max_in_flight = max_in_flight
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in EXEMPT_PATHS:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_in_flight:
            await _refuse(send, Overloaded("server overloaded; retry later", retry_after=RETRY_AFTER_SECONDS))
            return
        self.in_flight += 1
        body_received = False

        async def receive_uncounted() -> Message:
            # Waiting for the client's body is not load (the front end bounds it: body_timeout, the
            # byte limit, max_connections). Counted, a key's slow bodies held a slot each for the body
            # deadline: at its rate limit, two label-only keys filled every slot (red team #9 F2).
            # Once the body is in, a wait on receive() is a watch for the client leaving while the
            # answer is made (a streamed chat): that is load, and stays counted.
            nonlocal body_received
            if body_received:
                return await receive()
            self.in_flight -= 1
            try:
                message = await receive()
            finally:
                self.in_flight += 1
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_received = True
            return message

        try:
            await self.app(scope, receive_uncounted, send)
        finally:
            self.in_flight -= 1


async def _refuse(send: Send, error: Overloaded) -> None:
    body = orjson.dumps({"error": error.message, "code": error.code})
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        (b"x-content-type-options", b"nosniff"),
        (b"retry-after", str(int(error.retry_after)).encode()),
    ]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
