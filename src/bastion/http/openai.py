"""The OpenAI-compatible front end's encoding: `/v1` outcomes as OpenAI JSON and server-sent events.

Decisions are the core's (`Bastion.handle`); this module only shapes what it answered, so the
official `openai` client reads it unchanged: errors as `{"error": {"message", "type", "code"}}`
(the client picks its exception class by status), a stream as `chat.completion.chunk` events ending
in `data: [DONE]`, or in an error event (the client raises `APIError`) when the stream is cut off.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from bastion.context import RequestContext
from bastion.errors import BastionError
from bastion.llm.protocol import DONE_EVENT, chunk_event, completion_body, error_body, error_event
from bastion.llm.types import StreamEnd
from bastion.routes import Route
from bastion.service import Outcome

Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]
Receive = Callable[[], Awaitable[Message]]


def encode(route: Route, outcome: Outcome, ctx: RequestContext) -> Outcome:
    """A non-streamed `/v1` answer in OpenAI's shapes (errors included)."""
    body = outcome.body
    if outcome.status >= 400 and isinstance(body, dict):
        return Outcome(
            outcome.status, error_body(outcome.status, str(body["error"]), str(body["code"])), outcome.headers
        )
    chat = ctx.chat
    if route is Route.CHAT and chat is not None and chat.completion is not None:
        body = completion_body(ctx.request_id, chat.request.model, int(ctx.now), chat.completion)
        return Outcome(outcome.status, body, outcome.headers)
    return outcome


def _headers(ctx: RequestContext, extra: dict[str, str]) -> list[tuple[bytes, bytes]]:
    headers = [
        (b"content-type", b"text/event-stream; charset=utf-8"),
        (b"cache-control", b"no-store"),
        (b"x-content-type-options", b"nosniff"),
        (b"x-accel-buffering", b"no"),  # a proxy in front must pass events on as they come
        (b"x-request-id", ctx.request_id.encode()),
    ]
    headers.extend((k.lower().encode(), v.encode()) for k, v in extra.items())
    return headers


async def send_stream(send: Send, receive: Receive, outcome: Outcome, ctx: RequestContext) -> None:
    """Send a streamed answer as server-sent events. A client that goes away stops the generation
    (its stream is cancelled and closed, releasing the model and refunding unused tokens)."""
    stream, chat = outcome.stream, ctx.chat
    assert stream is not None and chat is not None
    model, created, request_id = chat.request.model, int(ctx.now), ctx.request_id
    await send({"type": "http.response.start", "status": 200, "headers": _headers(ctx, outcome.headers)})

    async def body(data: bytes) -> None:
        await send({"type": "http.response.body", "body": data, "more_body": True})

    async def pump() -> None:
        # As OpenAI does: the role first, with empty content, whatever comes next (an empty answer too).
        await body(chunk_event(request_id, model, created, delta={"role": "assistant", "content": ""}))
        try:
            async for item in stream:
                if isinstance(item, StreamEnd):
                    await body(
                        chunk_event(request_id, model, created, delta={}, finish_reason=item.finish_reason)
                    )
                    if chat.request.include_usage:
                        await body(chunk_event(request_id, model, created, usage=item.usage))
                    await body(DONE_EVENT)
                    return
                await body(chunk_event(request_id, model, created, delta={"content": item}))
        except BastionError as e:
            await body(error_event(e.status, e.message, e.code.value))

    async def client_gone() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    pumping, watching = asyncio.create_task(pump()), asyncio.create_task(client_gone())
    try:
        await asyncio.wait({pumping, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (pumping, watching):
            task.cancel()
        pumped, _ = await asyncio.gather(pumping, watching, return_exceptions=True)
        await stream.aclose()
    if isinstance(pumped, Exception):
        raise pumped  # a bug, not a refusal: the server logs it and closes the connection
    await send({"type": "http.response.body", "body": b"", "more_body": False})
