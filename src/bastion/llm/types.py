"""The language-model seam: what the OpenAI front end, the guards and the backends exchange.

Transport-neutral (no HTTP, no OpenAI JSON here): `/v1/chat/completions` decodes into a
`ChatRequest`; a `ChatBackend` (the local model, or an upstream OpenAI-compatible server)
turns messages into text; the leakage guard reads that text before any byte leaves.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class GenerationParams:
    """What the backend is asked for. `max_tokens` is already capped by policy."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


FinishReason = Literal["stop", "length"]


@dataclass(frozen=True, slots=True)
class Completion:
    text: str
    usage: Usage
    finish_reason: FinishReason


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """The last item of a backend's stream: token counts and why generation stopped."""

    usage: Usage
    finish_reason: FinishReason


class ChatBackend(Protocol):
    """A language model behind the runtime seam.

    `messages` already hold the protected system prompt (first) and the client's messages; the
    backend applies its own chat template. Errors: `bastion.errors.BackendUnavailable` (502/503)
    when the model or the upstream cannot answer; never the upstream's raw message or credential.
    """

    name: str  # the backend's own model id (for logs and `/v1/models` owned_by), not a secret

    async def complete(self, messages: Sequence[ChatMessage], params: GenerationParams) -> Completion: ...

    def stream(
        self, messages: Sequence[ChatMessage], params: GenerationParams
    ) -> AsyncIterator[str | StreamEnd]:
        """Text deltas as they are generated, then exactly one `StreamEnd`."""
        ...

    def count_tokens(self, messages: Sequence[ChatMessage]) -> int:
        """Prompt tokens these messages cost (chat template included); an upper estimate is fine."""
        ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ProtectedPrompt:
    """A confidential system prompt, declared by name in the policy file. Its text never leaves the
    server: not in an answer, a log, an error, a metric or an audit record (which carry `name` and
    `digest` only)."""

    name: str
    text: str
    digest: str  # "sha256:<hex>" of the text
    secrets: tuple[str, ...] = field(default=())  # exact strings that must never appear, in any encoding
