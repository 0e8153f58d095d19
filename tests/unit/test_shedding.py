"""Load shedding counts work, not waiting on the client (red team #9 F2), but a request whose body is in
and whose answer is being made stays counted while it watches for its client leaving (a streamed chat)."""

from __future__ import annotations

import asyncio
from typing import Any

from bastion.http.shedding import LoadShedder


def test_a_body_in_transit_is_not_counted_a_streamed_answer_is() -> None:
    seen: dict[str, int] = {}

    async def main() -> None:
        incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        shedder: LoadShedder

        async def app(scope: Any, receive: Any, send: Any) -> None:
            seen["working"] = shedder.in_flight
            first = await receive()  # the body's first part; the rest is late
            assert first["more_body"]
            await receive()  # the body's end
            seen["answering"] = shedder.in_flight
            await receive()  # streaming: watching for the client leaving

        async def receive() -> dict[str, Any]:
            return await incoming.get()

        async def send(message: Any) -> None:
            pass

        shedder = LoadShedder(app, max_in_flight=10)
        task = asyncio.create_task(shedder({"type": "http", "path": "/v1/chat/completions"}, receive, send))
        await asyncio.sleep(0.01)
        seen["waiting for the body"] = shedder.in_flight
        await incoming.put({"type": "http.request", "body": b"{", "more_body": True})
        await asyncio.sleep(0.01)
        seen["waiting for the rest"] = shedder.in_flight
        await incoming.put({"type": "http.request", "body": b"}", "more_body": False})
        await asyncio.sleep(0.01)
        seen["watching while streaming"] = shedder.in_flight
        await incoming.put({"type": "http.disconnect"})
        await task
        seen["done"] = shedder.in_flight

    asyncio.run(main())
    assert seen == {
        "working": 1,
        "waiting for the body": 0,
        "waiting for the rest": 0,
        "answering": 1,
        "watching while streaming": 1,
        "done": 0,
    }
