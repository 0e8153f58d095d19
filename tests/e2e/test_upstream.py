"""UpstreamChatBackend against a real upstream (xllamacpp's server with SmolLM2 in its own process)
and against raw-socket servers that misbehave: down, hanging, trickling, streaming without end,
echoing the prompt in an error body."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest

from bastion.llm.backend_errors import BackendUnavailable
from bastion.llm.types import ChatMessage, Completion, GenerationParams, StreamEnd
from bastion.llm.upstream import UpstreamChatBackend
from tests.helpers import llm_upstream

pytestmark = pytest.mark.slow

PROMPT = [ChatMessage("system", "You are a helpful assistant."), ChatMessage("user", "Name three colours.")]
GREEDY = GenerationParams(max_tokens=12)


@dataclass
class Upstream:
    url: str
    key: str


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    with llm_upstream() as (url, key):
        yield Upstream(url, key)


def _backend(url: str, credential: str | None, **kwargs: float) -> UpstreamChatBackend:
    return UpstreamChatBackend(url, "smollm2", credential=credential, **kwargs)  # type: ignore[arg-type]


async def _stream(backend: UpstreamChatBackend, params: GenerationParams = GREEDY) -> list[str | StreamEnd]:
    try:
        return [item async for item in backend.stream(PROMPT, params)]
    finally:
        await backend.aclose()


async def _complete(backend: UpstreamChatBackend, params: GenerationParams = GREEDY) -> Completion:
    try:
        return await backend.complete(PROMPT, params)
    finally:
        await backend.aclose()


def test_completion_and_stream_from_a_real_upstream(upstream: Upstream) -> None:
    completion = asyncio.run(_complete(_backend(upstream.url, upstream.key)))
    items = asyncio.run(_stream(_backend(upstream.url, upstream.key)))
    deltas, end = [d for d in items[:-1] if isinstance(d, str)], items[-1]
    assert len(deltas) == len(items) - 1  # text, then exactly one StreamEnd
    assert isinstance(end, StreamEnd)
    assert len(deltas) > 3
    assert completion.text and "".join(deltas) == completion.text
    assert end.usage == completion.usage
    assert end.usage.prompt_tokens > 10
    assert end.usage.completion_tokens <= 12
    short = asyncio.run(_complete(_backend(upstream.url, upstream.key), GenerationParams(max_tokens=3)))
    assert short.finish_reason == "length" and short.usage.completion_tokens == 3


@pytest.mark.parametrize("credential", ["wrong-" + "x" * 20, None])
def test_a_refused_credential_is_a_generic_error_without_the_credential(
    upstream: Upstream, credential: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    backend = _backend(upstream.url, credential)
    assert credential is None or credential not in repr(backend)
    for call in (_complete, _stream):
        with pytest.raises(BackendUnavailable) as refused:
            asyncio.run(call(_backend(upstream.url, credential)))
        error = refused.value
        assert (error.status, error.reason) == (502, "upstream_status_401")
        shown = f"{error} {error!r} {error.args} {error.__cause__!r}"
        assert "Invalid API Key" not in shown  # the upstream's body is not echoed
        assert credential is None or credential not in shown
    assert credential is None or credential not in caplog.text
    assert upstream.key not in caplog.text
    asyncio.run(backend.aclose())


def test_the_right_credential_never_shows(upstream: Upstream, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    backend = _backend(upstream.url, upstream.key)
    assert upstream.key not in repr(backend) and upstream.key not in str(vars(backend))
    asyncio.run(_complete(backend))
    assert upstream.key not in caplog.text


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_upstream_that_is_down_fails_fast() -> None:
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    for call in (_complete, _stream):
        started = time.monotonic()
        with pytest.raises(BackendUnavailable) as down:
            asyncio.run(call(_backend(url, "k")))
        assert time.monotonic() - started < 1.0
        assert (down.value.status, down.value.reason) == (502, "upstream_unreachable")


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[str]:
    """A TCP server on a loopback port that runs `handler` for each connection; yields its /v1 URL."""
    tasks: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await reader.readuntil(b"\r\n\r\n")
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(3600)


async def _trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n")
    while True:  # a byte every 0.1 s: never a gap long enough for the between-bytes timeout
        writer.write(b":")
        await writer.drain()
        await asyncio.sleep(0.1)


def _endless(unit: bytes) -> Handler:
    async def send(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n")
        while True:
            writer.write(unit * 64)
            await writer.drain()

    return send


async def _error_echoing_the_prompt(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    body = b'{"error": {"message": "bad request: You are a helpful assistant. Name three colours."}}'
    writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n")
    writer.write(b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    await writer.drain()


async def _against(
    handler: Handler, call: Callable[..., Awaitable[object]], **kwargs: float
) -> BackendUnavailable:
    async with raw_server(handler) as url:
        try:
            await call(_backend(url, "k", **kwargs))
        except BackendUnavailable as error:
            return error
    raise AssertionError("no error")


@pytest.mark.parametrize("call", [_complete, _stream])
def test_an_upstream_that_hangs_times_out(call: Callable[..., Awaitable[object]]) -> None:
    started = time.monotonic()
    error = asyncio.run(_against(_hang, call, timeout=0.5))
    assert 0.4 < time.monotonic() - started < 2.0
    assert (error.status, error.reason) == (504, "upstream_timeout")


def test_an_upstream_that_trickles_hits_the_whole_answer_deadline() -> None:
    started = time.monotonic()
    error = asyncio.run(_against(_trickle, _stream, timeout=0.5, total_timeout=1.0))
    assert 0.9 < time.monotonic() - started < 2.5
    assert (error.status, error.reason) == (504, "upstream_timeout")


@pytest.mark.parametrize(
    "unit",
    [
        b'data: {"choices": [{"index": 0, "delta": {"content": "la "}}]}\n\n',  # valid events, no end
        b"data: " + b"A" * 1024,  # one line that never ends
    ],
    ids=["endless-events", "endless-line"],
)
@pytest.mark.parametrize("call", [_complete, _stream])
def test_an_upstream_that_streams_without_end_is_cut_at_the_byte_cap(
    unit: bytes, call: Callable[..., Awaitable[object]]
) -> None:
    started = time.monotonic()
    error = asyncio.run(_against(_endless(unit), call, max_response_bytes=256 * 1024))
    assert time.monotonic() - started < 3.0
    assert (error.status, error.reason) == (502, "upstream_too_large")


def test_an_upstream_error_body_is_not_echoed() -> None:
    for call in (_complete, _stream):
        error = asyncio.run(_against(_error_echoing_the_prompt, call))
        assert (error.status, error.reason) == (502, "upstream_status_500")
        assert "helpful" not in f"{error} {error!r} {error.args}"
