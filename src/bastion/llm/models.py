"""The language models a policy file serves on `/v1`: each a backend, its protected prompt and its gate.

Built once at start-up from `[llm]`: prompts are read from their files, digested and checked
(each declared secret must occur in its prompt); backends are constructed (the local model is
loaded here, so a missing package fails start-up, not the first request).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from bastion.config import ChatModelSettings, Config, ProtectedPromptSettings
from bastion.errors import BackendError, ConfigError, ErrorCode, RateLimited
from bastion.llm.intent import ProtectedTerms
from bastion.llm.leakage import LeakageGuard
from bastion.llm.types import ChatBackend, ProtectedPrompt

log = logging.getLogger("bastion.llm")

_MAX_PROMPT_BYTES = 64 * 1024
CANARY_SECONDS = 300.0  # how long one canary serves a model's requests


class ConcurrencyGate:
    """At most `limit` generations at once, at most `waiting` callers queued; beyond, 503 `model_busy`
    at once (a queue without bound would hold every client's connection and memory). One principal
    may hold at most `per_principal` of the running and waiting places together (429 beyond), so one
    key cannot fill the queue and lock every other user out."""

    def __init__(self, limit: int, waiting: int) -> None:
        self._slots = asyncio.Semaphore(limit)
        self._max_waiting = waiting
        self._waiting = 0
        self._held: dict[str, int] = {}  # principal -> places it holds (running or waiting)

    @asynccontextmanager
    async def slot(self, principal: str, per_principal: int) -> AsyncIterator[None]:
        held = self._held.get(principal, 0)
        if held >= per_principal:
            raise RateLimited(
                f"{held} of this caller's requests to this model are already running or waiting",
                retry_after=1.0,
                code=ErrorCode.TOO_MANY_IN_FLIGHT,
            )
        self._held[principal] = held + 1
        try:
            async with self._place():
                yield
        finally:
            left = self._held[principal] - 1
            if left:
                self._held[principal] = left
            else:
                del self._held[principal]

    @asynccontextmanager
    async def _place(self) -> AsyncIterator[None]:
        if self._slots.locked():
            if self._waiting >= self._max_waiting:
                raise BackendError("the model is busy; try again shortly", code=ErrorCode.MODEL_BUSY)
            self._waiting += 1
            try:
                await self._slots.acquire()
            finally:
                self._waiting -= 1
        else:
            await self._slots.acquire()
        try:
            yield
        finally:
            self._slots.release()


@dataclass(slots=True)
class ChatModel:
    settings: ChatModelSettings
    backend: ChatBackend
    prompt: ProtectedPrompt | None
    gate: ConcurrencyGate
    guard: LeakageGuard | None  # None: no protected prompt, or unsafe_no_leakage_guard (benchmarks)
    # The words that name the prompt's secrets ("escalation code"), for prompt-extraction auditing.
    terms: ProtectedTerms | None = None
    # The planted prompt and its canary, and until when they serve (see `system_prompt`).
    _planted: tuple[str, str, float] | None = None

    def system_prompt(self, now: float, *, fresh: bool = False) -> tuple[str | None, str]:
        """The system message and its canary ("" without a guard).

        The canary changes every `CANARY_SECONDS` (and on `fresh`, for a regeneration), not every
        request: a canary new each request made the prompt's tail new each time, and the model
        re-read those tokens before every answer (+127 ms to the first token at one thread, measured
        in bench/LLM.md); one per window keeps the whole prompt in the model's cache. An attacker who
        learns the canary gains nothing: the guard refuses any answer holding it, in any view."""
        if self.guard is None:
            return (self.prompt.text if self.prompt is not None else None), ""
        planted = self._planted
        if fresh or planted is None or now >= planted[2]:
            text, canary = self.guard.plant_canary()
            planted = self._planted = (text, canary, now + CANARY_SECONDS)
        return planted[0], planted[1]

    @property
    def name(self) -> str:
        return self.settings.name


def load_prompt(name: str, settings: ProtectedPromptSettings, config_path: Path) -> ProtectedPrompt:
    """Raises ConfigError naming the field; the message never quotes the prompt or a secret."""
    where = f"{config_path}: llm.prompts.{name}"
    try:
        raw = settings.file.read_bytes()
    except OSError as e:
        raise ConfigError(f"{where}.file: cannot read {settings.file}: {e.strerror}") from None
    if len(raw) > _MAX_PROMPT_BYTES:
        raise ConfigError(f"{where}.file: larger than {_MAX_PROMPT_BYTES} bytes")
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"{where}.file: not UTF-8 text") from None
    if not text:
        raise ConfigError(f"{where}.file: empty")
    for i, secret in enumerate(settings.secrets):
        if secret not in text:
            raise ConfigError(f"{where}.secrets.{i}: does not occur in the prompt's text")
    digest = "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()
    return ProtectedPrompt(name=name, text=text, digest=digest, secrets=tuple(settings.secrets))


def build_backend(settings: ChatModelSettings, config_path: Path) -> ChatBackend:
    where = f"{config_path}: llm.models.{settings.name}"
    if settings.backend == "local":
        from bastion.llm.local import LocalChatBackend

        try:
            return LocalChatBackend(n_ctx=settings.context_tokens, max_waiting=settings.max_waiting)
        except Exception as e:  # a missing package or model file stops start-up with its reason
            raise ConfigError(
                f"{where}.backend: the local model cannot load: {type(e).__name__}: {e}"
            ) from None
    from bastion.llm.upstream import UpstreamChatBackend, resolve_credential

    assert settings.upstream_url is not None  # the config validator guarantees it
    credential = None
    if settings.upstream_credential is not None:
        try:
            credential = resolve_credential(settings.upstream_credential)
        except Exception as e:  # its message names the variable or file, never the value
            raise ConfigError(f"{where}.upstream_credential: {e}") from None
    return UpstreamChatBackend(
        settings.upstream_url,
        settings.upstream_model or settings.name,
        credential=credential,
        timeout=settings.upstream_timeout_seconds,
    )


def load_chat_models(
    config: Config, config_path: Path, *, backends: Mapping[str, ChatBackend] | None = None
) -> dict[str, ChatModel]:
    """`backends`: ready backends by model name, instead of building them (tests and benchmarks
    put a scripted backend beside the real ones this way)."""
    prompts = {
        name: load_prompt(name, settings, config_path) for name, settings in config.llm.prompts.items()
    }
    guards = {}  # one per prompt: built at start-up, where a prompt too short to protect is refused
    for name, loaded in prompts.items():
        try:
            guards[loaded.digest] = LeakageGuard(loaded)
        except ConfigError as e:
            raise ConfigError(f"{config_path}: llm.prompts.{name}: {e}") from None
    models = {}
    for settings in config.llm.models:
        if settings.unsafe_no_leakage_guard:
            log.warning(
                "UNSAFE: model %s answers without the leakage guard (benchmark baseline only)", settings.name
            )
        given = (backends or {}).get(settings.name)
        backend = given if given is not None else build_backend(settings, config_path)
        prompt = prompts[settings.prompt] if settings.prompt is not None else None
        models[settings.name] = ChatModel(
            settings=settings,
            backend=backend,
            prompt=prompt,
            gate=ConcurrencyGate(settings.max_concurrent, settings.max_waiting),
            guard=guards.get(prompt.digest) if prompt and not settings.unsafe_no_leakage_guard else None,
            terms=ProtectedTerms.from_prompt(prompt) if prompt is not None else None,
        )
    return models
