"""In-process checks of the upstream backend: credential specs, URL refusal, the bounded SSE reader."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bastion.errors import ConfigError
from bastion.llm.backend_errors import BackendUnavailable
from bastion.llm.upstream import UpstreamChatBackend, _sse_data, resolve_credential

SECRET = "sk-test-0123456789abcdef"


def test_env_credential(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UPSTREAM_KEY", f"  {SECRET}\n")
    assert resolve_credential("env:UPSTREAM_KEY") == SECRET
    monkeypatch.delenv("UPSTREAM_KEY")
    with pytest.raises(ConfigError, match="env:UPSTREAM_KEY: the environment variable is not set"):
        resolve_credential("env:UPSTREAM_KEY")


def test_file_credential_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_text(SECRET + "\n")
    path.chmod(0o600)
    assert resolve_credential(f"file:{path}") == SECRET
    path.chmod(0o640)
    assert resolve_credential(f"file:{path}") == SECRET


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "no such file"),
        ("world", "readable or writable by every user"),
        ("dir", "not a regular file"),
        ("empty", "empty"),
        ("newline", "characters an HTTP header cannot carry"),
    ],
)
def test_bad_credential_files_are_refused_without_the_value(tmp_path: Path, setup: str, message: str) -> None:
    path = tmp_path / "key"
    if setup == "world":
        path.write_text(SECRET)
        path.chmod(0o644)
    elif setup == "dir":
        path.mkdir()
    elif setup == "empty":
        path.write_text(" \n")
        path.chmod(0o600)
    elif setup == "newline":
        path.write_text(f"{SECRET}\r\nX-Injected: 1")
        path.chmod(0o600)
    with pytest.raises(ConfigError, match=message) as refused:
        resolve_credential(f"file:{path}")
    assert SECRET not in str(refused.value)
    assert str(path) in str(refused.value)


@pytest.mark.parametrize("spec", [SECRET, f"Bearer {SECRET}", "env:", "file:", f"vault:{SECRET}"])
def test_a_spec_that_is_not_env_or_file_is_refused_without_echoing_it(spec: str) -> None:
    with pytest.raises(ConfigError) as refused:
        resolve_credential(spec)
    assert SECRET not in str(refused.value)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://host/v1",
        "http:///v1",
        f"http://user:{SECRET}@host/v1",
        f"http://host/v1?key={SECRET}",
        "http://host/v1#x",
        "not a url",
    ],
)
def test_bad_upstream_urls_are_refused_without_echoing_them(url: str) -> None:
    with pytest.raises(ConfigError) as refused:
        UpstreamChatBackend(url, "m")
    assert SECRET not in str(refused.value)


def test_a_credential_that_cannot_be_a_header_is_refused_without_echo() -> None:
    with pytest.raises(ConfigError) as refused:
        UpstreamChatBackend("http://127.0.0.1:1/v1", "m", credential=f"{SECRET}\nX: y")
    assert SECRET not in str(refused.value)


def test_repr_and_vars_hide_the_credential() -> None:
    backend = UpstreamChatBackend("http://127.0.0.1:1/v1/", "m", credential=SECRET)
    assert repr(backend) == "UpstreamChatBackend('http://127.0.0.1:1/v1', 'm')"
    assert SECRET not in str(vars(backend))
    asyncio.run(backend.aclose())


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def _events(limit: int, *parts: bytes) -> list[str]:
    return [data async for data in _sse_data(_chunks(*parts), limit)]


def test_sse_reader_joins_split_lines_and_data_fields() -> None:
    stream = (
        b'data: {"a":1}\r\n\r\n: comment\n\nevent: x\ndata: one\ndata:two\n\nda',
        b"ta: [DONE]\n\n",
        b"data: unfinished",
    )
    assert asyncio.run(_events(1 << 20, *stream)) == ['{"a":1}', "one\ntwo", "[DONE]"]


def test_sse_reader_caps_bytes_even_without_a_newline() -> None:
    with pytest.raises(BackendUnavailable) as capped:
        asyncio.run(_events(1000, *[b"data: " + b"A" * 100] * 20))
    assert capped.value.reason == "upstream_too_large"
