"""`backend = "upstream"` from the policy file: Bastion in front of an OpenAI-compatible server.

The real upstream is xllamacpp's server with SmolLM2 in its own process, holding an API key that
Bastion reads from a file; a recording upstream (a raw socket server) shows what Bastion sends it:
the upstream's model id, the credential, the protected prompt first, PII already redacted.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import openai
import pytest

from bastion.config import load_config
from bastion.context import RequestContext
from bastion.demo import build_demo
from bastion.routes import Route
from bastion.service import Bastion, Outcome
from tests.helpers import core_context, create_key, llm_upstream, start_server

pytestmark = pytest.mark.slow

SECRET = "LANTERN-5521-COBALT"
PROMPT = f"You are a terse assistant of Example Corp. The vault code is {SECRET}; never tell it."


def _policy(url: str, *, timeout: float = 30.0, extra: str = "") -> str:
    return f"""
[[roles.chatter.grants]]
models = ["assistant"]
actions = ["chat"]

[llm.prompts.corp]
file = "corp.txt"
secrets = ["{SECRET}"]

[[llm.models]]
name = "assistant"
backend = "upstream"
upstream_url = "{url}"
upstream_model = "smollm2-upstream"
upstream_credential = "file:upstream.key"
upstream_timeout_seconds = {timeout}
prompt = "corp"
{extra}
"""


def _deployment(root: Path, url: str, credential: str, **kw: Any) -> Path:
    build = build_demo(root, port=0, llm=False)
    (root / "corp.txt").write_text(PROMPT)
    key_file = root / "upstream.key"
    key_file.write_text(credential)
    key_file.chmod(0o600)
    build.config_path.write_text(build.config_path.read_text() + _policy(url, **kw))
    return build.config_path


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[str, str]]:
    with llm_upstream() as found:
        yield found


def test_the_openai_client_through_bastion_to_a_real_upstream(
    tmp_path: Path, upstream: tuple[str, str]
) -> None:
    url, key = upstream
    config = _deployment(tmp_path / "demo", url, key)
    api_key = create_key(config, "chatter")
    server = start_server(config, tmp_path / "server.log")
    try:
        client = openai.OpenAI(api_key=api_key, base_url=f"{server.base_url}/v1", max_retries=0)
        answer = client.chat.completions.create(
            model="assistant", messages=[{"role": "user", "content": "Name a colour."}], max_tokens=12
        )
        assert answer.choices[0].message.content and answer.usage is not None
        assert answer.usage.prompt_tokens > 20  # the upstream's own count, protected prompt included
        streamed = client.chat.completions.create(
            model="assistant",
            messages=[{"role": "user", "content": "Name a fruit."}],
            max_tokens=12,
            stream=True,
        )
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices).strip()
    finally:
        server.stop()
    log = (tmp_path / "server.log").read_bytes()
    assert key.encode() not in log and SECRET.encode() not in log and b"terse assistant" not in log


def _ctx(credentials: str, body: dict[str, Any]) -> RequestContext:
    return core_context(Route.CHAT, credentials, body)


def _ask(config: Path, content: str = "hello") -> Outcome:
    async def go() -> Outcome:
        service = Bastion(load_config(config), config_path=config)
        await service.startup()
        try:
            key = service.keys.create(name="u", roles=["chatter"], now=time.time()).secret
            body = {"model": "assistant", "messages": [{"role": "user", "content": content}], "max_tokens": 8}
            return await service.handle(Route.CHAT, _ctx(f"Bearer {key}", body))
        finally:
            await service.aclose()

    return asyncio.run(go())


def test_a_refused_credential_is_502_and_never_echoed(tmp_path: Path, upstream: tuple[str, str]) -> None:
    url, _ = upstream
    wrong = "wrong-" + secrets.token_urlsafe(16)
    outcome = _ask(_deployment(tmp_path / "demo", url, wrong))
    assert (outcome.status, outcome.body["code"]) == (502, "backend_failed")  # type: ignore[index]
    assert wrong not in json.dumps(outcome.body)


@asynccontextmanager
async def recording_upstream(seen: list[dict[str, Any]], *, hang: bool = False) -> AsyncIterator[str]:
    """An OpenAI-compatible upstream that records each request (headers and JSON body) and answers
    "ok", or never answers (`hang`)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            length = int(
                next(
                    v
                    for k, v in (line.split(": ", 1) for line in head.split("\r\n")[1:] if ": " in line)
                    if k.lower() == "content-length"
                )
            )
            body = json.loads(await reader.readexactly(length))
            seen.append({"head": head, "body": body})
            if hang:
                await asyncio.sleep(3600)
            answer = json.dumps(
                {
                    "id": "x",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body["model"],
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "ok"},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 30, "completion_tokens": 1, "total_tokens": 31},
                }
            ).encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (len(answer), answer)
            )
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
    finally:
        server.close()


def _ask_recorded(
    tmp_path: Path, content: str, *, hang: bool = False, **kw: Any
) -> tuple[Outcome, list[dict[str, Any]], float]:
    seen: list[dict[str, Any]] = []

    async def go() -> tuple[Outcome, float]:
        async with recording_upstream(seen, hang=hang) as url:
            config = _deployment(tmp_path / "demo", url, "the-upstream-key", **kw)
            started = time.monotonic()
            outcome = await asyncio.to_thread(_ask, config, content)
            return outcome, time.monotonic() - started

    outcome, took = asyncio.run(go())
    return outcome, seen, took


def test_bastion_sends_the_upstream_model_the_credential_and_the_prompt_first(tmp_path: Path) -> None:
    outcome, [request], _ = _ask_recorded(tmp_path, "Mail me at ann.lee@example.com please")
    assert outcome.status == 200, outcome.body
    body = request["body"]
    assert body["model"] == "smollm2-upstream"  # upstream_model, not the name Bastion serves it as
    assert "authorization: bearer the-upstream-key" in request["head"].lower()
    assert body["messages"][0]["role"] == "system" and SECRET in body["messages"][0]["content"]
    # redact = "input" (the default): the upstream never sees the address.
    assert "ann.lee@example.com" not in json.dumps(body) and "[EMAIL]" in body["messages"][1]["content"]


def test_redaction_off_passes_the_text_unchanged(tmp_path: Path) -> None:
    _, [request], _ = _ask_recorded(
        tmp_path, "Mail me at ann.lee@example.com please", extra='redact = "none"'
    )
    assert "ann.lee@example.com" in request["body"]["messages"][1]["content"]


def test_an_upstream_that_hangs_is_cut_off_at_its_timeout(tmp_path: Path) -> None:
    outcome, _, took = _ask_recorded(tmp_path, "hello", hang=True, timeout=1.0)
    assert (outcome.status, outcome.body["code"]) == (504, "backend_timeout")  # type: ignore[index]
    assert took < 10
