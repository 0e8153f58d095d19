"""A language model behind any OpenAI-compatible server (vLLM, llama.cpp's server, xllamacpp's).

`POST {base_url}/chat/completions`, streamed (server-sent events ending in `data: [DONE]`) or not,
over one pooled `httpx.AsyncClient`. What comes back is bounded: a connect timeout, a timeout
between bytes, a deadline for the whole answer, and a cap on the bytes read (an upstream that
streams without end, or one endless line, is cut there). Token counts are the upstream's own
`usage` (asked for with `stream_options.include_usage`); an answer without them is refused, as the
token budgets need exact counts.

Every failure becomes `BackendUnavailable` with a fixed, generic message: the upstream's body is
never read on an error status, never echoed (it could quote the prompt), and the credential is
never in a message, a repr or a log. `reason` (e.g. "upstream_status_401") tells operators which.
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Sequence
from contextlib import AsyncExitStack, aclosing
from pathlib import Path
from typing import Any, TypeVar

import httpx
import orjson

from bastion.errors import BadRequest, ConfigError, ErrorCode
from bastion.llm.backend_errors import BackendStatus, BackendUnavailable
from bastion.llm.types import ChatMessage, Completion, FinishReason, GenerationParams, StreamEnd, Usage

MAX_CREDENTIAL_FILE_BYTES = 64 * 1024
DEFAULT_MAX_RESPONSE_BYTES = 8 * 1024 * 1024
# count_tokens' upper estimate: at most one token per UTF-8 byte (byte-level BPE and byte-fallback
# tokenizers), plus a chat template's markers around each message and a default system prompt.
_TEMPLATE_TOKENS_PER_MESSAGE = 8
_TEMPLATE_TOKENS_FIXED = 64

_T = TypeVar("_T")


def resolve_credential(spec: str) -> str:
    """The secret a credential spec names: `env:NAME` (an environment variable) or `file:PATH`.

    The file must be a regular file, not readable or writable by every user (mode 0600 or 0640;
    a Kubernetes secret volume needs `defaultMode: 0440` or tighter), at most 64 KiB; surrounding
    whitespace is stripped. Raises `ConfigError` naming the variable or the file and what is wrong,
    never the value (nor the spec itself when it is not one of the two forms: it may be the secret).
    """
    kind, _, ref = spec.partition(":")
    if kind == "env" and ref:
        raw = os.environ.get(ref)
        if raw is None:
            raise ConfigError(f"credential env:{ref}: the environment variable is not set")
        where = f"env:{ref}"
    elif kind == "file" and ref:
        path = Path(ref)
        try:
            info = path.stat()
        except FileNotFoundError:
            raise ConfigError(f"credential file:{path}: no such file") from None
        except OSError as exc:
            raise ConfigError(f"credential file:{path}: cannot be read ({exc.strerror})") from None
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"credential file:{path}: not a regular file")
        if info.st_mode & (stat.S_IROTH | stat.S_IWOTH):
            raise ConfigError(
                f"credential file:{path}: readable or writable by every user (mode {stat.S_IMODE(info.st_mode):04o}); "
                "chmod 600 it"
            )
        if info.st_size > MAX_CREDENTIAL_FILE_BYTES:
            raise ConfigError(f"credential file:{path}: larger than {MAX_CREDENTIAL_FILE_BYTES} bytes")
        try:
            raw = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            raise ConfigError(f"credential file:{path}: cannot be read as UTF-8 text") from None
        where = f"file:{path}"
    else:
        raise ConfigError("a credential is given as env:NAME or file:PATH, not as its value")
    value = raw.strip()
    if not value:
        raise ConfigError(f"credential {where}: empty")
    if not _header_safe(value):
        raise ConfigError(f"credential {where}: holds characters an HTTP header cannot carry")
    return value


def _header_safe(value: str) -> bool:
    # Visible ASCII only: httpx/h11 would otherwise refuse the header with an error quoting it.
    return all("!" <= c <= "~" for c in value)


class _Secret:
    """A credential that shows as `<redacted>` in every repr and str."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<redacted>"

    __str__ = __repr__


class UpstreamChatBackend:
    """A `ChatBackend` that forwards to an OpenAI-compatible server.

    `base_url` ends before `/chat/completions` (e.g. "http://10.0.0.5:8000/v1"); http or https, no
    user, query or fragment. `model` is sent as the request's `model` and is this backend's `name`.
    `credential`: the resolved secret (see `resolve_credential`), sent as `Authorization: Bearer`.
    Timeouts in seconds: `connect_timeout` to open a connection; `timeout` without a byte from the
    upstream (or to send the request, or to get a pooled connection); `total_timeout` for a whole
    answer, streamed or not. `max_response_bytes` caps what is read of one answer.
    `transport` replaces the network (e.g. `httpx.AsyncHTTPTransport(uds=...)` for a Unix socket).
    Raises `ConfigError` for a bad URL or credential.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        credential: str | None = None,
        timeout: float = 60.0,
        connect_timeout: float = 5.0,
        total_timeout: float = 600.0,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        max_connections: int = 32,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        try:
            url = httpx.URL(base_url)
        except httpx.InvalidURL:
            raise ConfigError("upstream URL: not a URL") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise ConfigError("upstream URL: must be http:// or https:// with a host")
        if url.userinfo or url.query or url.fragment:
            raise ConfigError(
                "upstream URL: must not hold a user, a query or a fragment (give the credential apart)"
            )
        if credential is not None and (not credential or not _header_safe(credential)):
            raise ConfigError("upstream credential: empty or holds characters an HTTP header cannot carry")
        self.name = model
        self.base_url = str(url).rstrip("/")
        self._url = self.base_url + "/chat/completions"
        self._credential = _Secret(credential) if credential is not None else None
        self._total_timeout = total_timeout
        self._max_bytes = max_response_bytes
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            follow_redirects=False,  # a redirect could carry the credential elsewhere
            trust_env=False,  # no proxy or .netrc from the environment sees the credential
            transport=transport,
        )

    def __repr__(self) -> str:
        return f"UpstreamChatBackend({self.base_url!r}, {self.name!r})"

    # -- the ChatBackend protocol -------------------------------------------------------------

    async def complete(self, messages: Sequence[ChatMessage], params: GenerationParams) -> Completion:
        """The whole answer. Raises `BadRequest` (a parameter out of range) or `BackendUnavailable`:
        502 (unreachable, error status, malformed or oversized answer, no usage), 503 (the upstream
        says it is busy: 429 or 503), 504 (timeout)."""
        body = self._body(messages, params, stream=False)
        deadline = asyncio.get_running_loop().time() + self._total_timeout
        try:
            async with AsyncExitStack() as stack:
                response = await _by(deadline, stack.enter_async_context(self._post(body)))
                raw = await _by(deadline, _read_capped(response, self._max_bytes))
        except (httpx.HTTPError, TimeoutError) as exc:
            raise _transport_error(exc) from None
        try:
            answer = orjson.loads(raw)
            choice = answer["choices"][0]
            content = choice["message"].get("content") or ""
            if not isinstance(content, str):
                raise TypeError
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
            raise _malformed() from None
        return Completion(content, _usage(answer.get("usage")), _finish_reason(choice.get("finish_reason")))

    async def stream(
        self, messages: Sequence[ChatMessage], params: GenerationParams
    ) -> AsyncGenerator[str | StreamEnd, None]:
        """Text deltas as the upstream sends them, then one `StreamEnd` with the upstream's usage.
        Closing the iterator closes the connection (vLLM and llama.cpp then stop generating).
        Raises as `complete`; a stream that ends without a finish reason and usage raises at its end."""
        body = self._body(messages, params, stream=True)
        deadline = asyncio.get_running_loop().time() + self._total_timeout
        finish: FinishReason | None = None
        usage: Usage | None = None
        async with AsyncExitStack() as stack:
            try:
                response = await _by(deadline, stack.enter_async_context(self._post(body)))
                events = await stack.enter_async_context(
                    aclosing(_sse_data(response.aiter_bytes(), self._max_bytes))
                )
            except (httpx.HTTPError, TimeoutError) as exc:
                raise _transport_error(exc) from None
            while True:
                try:
                    data = await _by(deadline, anext(events))
                except StopAsyncIteration:
                    break
                except (httpx.HTTPError, TimeoutError) as exc:
                    raise _transport_error(exc) from None
                if data == "[DONE]":
                    break
                try:
                    chunk = orjson.loads(data)
                    if "error" in chunk:
                        raise BackendUnavailable(
                            "the upstream language model failed", status=502, reason="upstream_stream_error"
                        )
                    for choice in chunk.get("choices") or ():
                        content = (choice.get("delta") or {}).get("content")
                        if content is not None and not isinstance(content, str):
                            raise TypeError
                        if content:
                            yield content
                        if choice.get("finish_reason") is not None:
                            finish = _finish_reason(choice["finish_reason"])
                    if chunk.get("usage") is not None:
                        usage = _usage(chunk["usage"])
                except (orjson.JSONDecodeError, TypeError, AttributeError):
                    raise _malformed() from None
        if finish is None:
            raise BackendUnavailable(
                "the upstream language model stopped mid-answer", status=502, reason="upstream_incomplete"
            )
        if usage is None:
            raise _no_usage()
        yield StreamEnd(usage, finish)

    def count_tokens(self, messages: Sequence[ChatMessage]) -> int:
        """An upper estimate (the upstream's tokenizer is not here): one token per UTF-8 byte of each
        message, 8 per message for the template's markers, 64 more for a default system prompt."""
        return _TEMPLATE_TOKENS_FIXED + sum(
            len(m.content.encode("utf-8")) + _TEMPLATE_TOKENS_PER_MESSAGE for m in messages
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    # -- internals --------------------------------------------------------------------------------

    def _body(
        self, messages: Sequence[ChatMessage], params: GenerationParams, *, stream: bool
    ) -> dict[str, Any]:
        if not messages:
            raise BadRequest("no messages", code=ErrorCode.MALFORMED_REQUEST)
        if params.max_tokens < 1:
            raise BadRequest("max_tokens must be at least 1", code=ErrorCode.UNSUPPORTED_PARAMETER)
        if not 0.0 <= params.temperature <= 2.0:
            raise BadRequest("temperature must be 0 to 2", code=ErrorCode.UNSUPPORTED_PARAMETER)
        if not 0.0 < params.top_p <= 1.0:
            raise BadRequest("top_p must be above 0 and at most 1", code=ErrorCode.UNSUPPORTED_PARAMETER)
        body: dict[str, Any] = {
            "model": self.name,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "n": 1,
            "stream": stream,
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        return body

    def _post(self, body: dict[str, Any]) -> _Exchange:
        headers = {"Accept-Encoding": "identity"}  # what is counted against the cap is what arrives
        if self._credential is not None:
            headers["Authorization"] = f"Bearer {self._credential.reveal()}"
        return _Exchange(self._client, self._url, orjson.dumps(body), headers)


class _Exchange:
    """`client.stream("POST", ...)` that refuses a non-200 answer without reading its body."""

    def __init__(self, client: httpx.AsyncClient, url: str, content: bytes, headers: dict[str, str]) -> None:
        self._context = client.stream(
            "POST", url, content=content, headers={**headers, "Content-Type": "application/json"}
        )

    async def __aenter__(self) -> httpx.Response:
        response = await self._context.__aenter__()
        if response.status_code != 200:
            await self._context.__aexit__(None, None, None)
            raise _status_error(response.status_code)
        return response

    async def __aexit__(self, *exc: object) -> None:
        await self._context.__aexit__(*exc)  # type: ignore[arg-type]


async def _by(deadline: float, awaitable: Awaitable[_T]) -> _T:
    """Await `awaitable`, raising `TimeoutError` at `deadline` (the loop's clock)."""
    async with asyncio.timeout_at(deadline):
        return await awaitable


async def _read_capped(response: httpx.Response, limit: int) -> bytes:
    declared = response.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large()
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > limit:
            raise _too_large()
    return bytes(body)


async def _sse_data(chunks: AsyncIterator[bytes], limit: int) -> AsyncGenerator[str, None]:
    """The `data` of each server-sent event, reading at most `limit` bytes in all.

    The event-stream format of the WHATWG HTML standard (§9.2.6), the part OpenAI-style streams
    use: lines end in LF or CRLF; `data:` fields of one event are joined by LF; a blank line ends
    the event; comments and other fields are ignored; an unfinished last event is dropped. Written
    here rather than taken from httpx-sse because that reads lines of any length before a cap
    could apply.
    """
    received = 0
    buffer = bytearray()
    data: list[bytes] = []
    async for chunk in chunks:
        received += len(chunk)
        if received > limit:
            raise _too_large()
        buffer += chunk
        start = 0
        while (end := buffer.find(b"\n", start)) != -1:
            line = bytes(buffer[start:end]).removesuffix(b"\r")
            start = end + 1
            if not line:
                if data:
                    try:
                        yield b"\n".join(data).decode("utf-8")
                    except UnicodeDecodeError:
                        raise _malformed() from None
                    data = []
                continue
            field, _, value = line.partition(b":")
            if field == b"data":
                data.append(value.removeprefix(b" "))
        del buffer[:start]


def _usage(value: object) -> Usage:
    if not isinstance(value, dict):
        raise _no_usage()
    prompt, completion = value.get("prompt_tokens"), value.get("completion_tokens")
    if type(prompt) is not int or type(completion) is not int or prompt < 0 or completion < 0:
        raise _no_usage()
    return Usage(prompt, completion)


def _no_usage() -> BackendUnavailable:
    return BackendUnavailable(
        "the upstream language model gave no token counts", status=502, reason="upstream_no_usage"
    )


def _finish_reason(value: object) -> FinishReason:
    if value == "stop" or value == "length":
        return value
    # content_filter, tool_calls, function_call, anything else: not an answer this seam can pass on
    raise BackendUnavailable(
        "the upstream language model ended its answer oddly", status=502, reason="upstream_finish_reason"
    )


def _status_error(status: int) -> BackendUnavailable:
    busy = status in (429, 503)
    code: BackendStatus = 503 if busy else 502
    reason = f"upstream_status_{status}" if 100 <= status <= 599 else "upstream_status_other"
    return BackendUnavailable(
        "the upstream language model is busy"
        if busy
        else "the upstream language model answered with an error",
        status=code,
        reason=reason,
    )


def _transport_error(exc: BaseException) -> BackendUnavailable:
    if isinstance(exc, BackendUnavailable):
        return exc
    if isinstance(exc, TimeoutError | httpx.TimeoutException):
        return BackendUnavailable(
            "the upstream language model did not answer in time", status=504, reason="upstream_timeout"
        )
    return BackendUnavailable(
        "the upstream language model cannot be reached", status=502, reason="upstream_unreachable"
    )


def _too_large() -> BackendUnavailable:
    return BackendUnavailable(
        "the upstream language model's answer is too large", status=502, reason="upstream_too_large"
    )


def _malformed() -> BackendUnavailable:
    return BackendUnavailable(
        "the upstream language model's answer is malformed", status=502, reason="upstream_malformed"
    )
