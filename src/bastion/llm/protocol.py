"""OpenAI chat-completions codec: the request body into a `ChatRequest`, answers into OpenAI JSON.

Only well-formedness is checked here (400 with the field's name); what a principal may ask for
(max_tokens, message count, the model) is the stages' job. Parameters Bastion cannot honour
(`n` > 1, tools, logprobs, response_format, penalties...) are refused by name, never accepted and
ignored. Shapes follow the OpenAI API reference (platform.openai.com/docs/api-reference/chat).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from bastion.errors import BadRequest, ErrorCode
from bastion.llm.types import ChatMessage, Completion, Usage
from bastion.protocol import parse_json

_MAX_STOP = 4  # OpenAI's own limit on stop sequences


# Strict: "5" is not an integer and 0 is not a boolean, as the OpenAPI document says.
_STRICT = ConfigDict(extra="forbid", frozen=True, strict=True)


def _integral(value: object) -> object:
    """JSON Schema's integer is any number with no fraction: 5.0 is 5 (and 5.5 stays refused)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


# An integer as JSON Schema reads one (strict mode alone would refuse 5.0).
Integer = Annotated[int, BeforeValidator(_integral)]


class _Part(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class _Message(BaseModel):
    model_config = _STRICT
    # "developer" is OpenAI's newer name for the system role: both are a client's system message.
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_Part]
    name: Annotated[str, Field(max_length=64)] | None = None


class _StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class _Body(BaseModel):
    model_config = _STRICT
    model: Annotated[str, Field(min_length=1, max_length=64)]
    messages: Annotated[list[_Message], Field(min_length=1)]
    max_tokens: Annotated[Integer, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[Integer, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    stop: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=_MAX_STOP)]
        | None
    ) = None
    stream: bool | None = None
    stream_options: _StreamOptions | None = None
    seed: Annotated[Integer, Field(ge=-(2**63), lt=2**63)] | None = None  # OpenAI's: a 64-bit integer
    n: Annotated[Integer, Field(ge=1, le=1)] | None = None  # one choice: more would multiply leak chances
    # Accepted as OpenAI documents it: an end-user id for abuse monitoring. Bastion audits a digest of it.
    user: Annotated[str, Field(max_length=256)] | None = None


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """A decoded `/v1/chat/completions` body. `max_tokens` None: the caller left it to policy."""

    model: str
    messages: tuple[ChatMessage, ...]  # as the client sent them ("developer" read as "system")
    max_tokens: int | None
    temperature: float | None  # None: the model's default (policy)
    top_p: float | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    seed: int | None
    user: str | None


_UNION_TAG = re.compile(r"^(str|int|float|bool|none|list\[.*\]|constrained-.*|function-.*)$")


def decode_chat_request(body: bytes) -> ChatRequest:
    """Raises BadRequest (400 `malformed_json` / `malformed_request` / `unsupported_parameter`) naming
    the field, never quoting a message's content."""
    doc = parse_json(body)
    if not isinstance(doc, dict):
        raise BadRequest("the body must be a JSON object", code=ErrorCode.MALFORMED_REQUEST)
    try:
        parsed = _Body.model_validate(doc)
    except ValidationError as e:
        err = e.errors()[0]
        # pydantic names the union member it tried ("content.str", "stop.list[...]"): not a field.
        path = [str(p) for p in err["loc"] if not _UNION_TAG.match(str(p))]
        where = ".".join(path) or "(body)"
        if len(path) < len(err["loc"]):  # a union: the first member's complaint would mislead
            raise BadRequest(
                f"{where}: not one of the accepted forms (see /v2/openapi.json)",
                code=ErrorCode.MALFORMED_REQUEST,
            ) from None
        if err["type"] == "extra_forbidden":
            raise BadRequest(
                f"{where}: not supported by this server", code=ErrorCode.UNSUPPORTED_PARAMETER
            ) from None
        # The library's message names the rule; the input's value is never repeated.
        raise BadRequest(f"{where}: {err['msg']}", code=ErrorCode.MALFORMED_REQUEST) from None
    if parsed.max_tokens is not None and parsed.max_completion_tokens is not None:
        raise BadRequest("max_tokens and max_completion_tokens: give one", code=ErrorCode.MALFORMED_REQUEST)
    if parsed.stream_options is not None and not parsed.stream:
        raise BadRequest("stream_options: only with stream = true", code=ErrorCode.MALFORMED_REQUEST)
    stop = (parsed.stop,) if isinstance(parsed.stop, str) else tuple(parsed.stop or ())
    return ChatRequest(
        model=parsed.model,
        messages=tuple(_message(m) for m in parsed.messages),
        max_tokens=parsed.max_tokens if parsed.max_tokens is not None else parsed.max_completion_tokens,
        temperature=parsed.temperature,
        top_p=parsed.top_p,
        stop=stop,
        stream=bool(parsed.stream),
        include_usage=parsed.stream_options is not None and parsed.stream_options.include_usage,
        seed=parsed.seed,
        user=parsed.user,
    )


def _message(m: _Message) -> ChatMessage:
    content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
    role: Literal["system", "user", "assistant"] = "system" if m.role == "developer" else m.role
    return ChatMessage(role, content)


# Encoding answers: the OpenAI JSON shapes.


def completion_body(request_id: str, model: str, created: int, completion: Completion) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": completion.text},
                "finish_reason": completion.finish_reason,
                "logprobs": None,
            }
        ],
        "usage": usage_body(completion.usage),
    }


def usage_body(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def chunk_event(
    request_id: str,
    model: str,
    created: int,
    *,
    delta: dict[str, str] | None = None,
    finish_reason: str | None = None,
    usage: Usage | None = None,
) -> bytes:
    """One server-sent event of a streamed answer: `data: {chat.completion.chunk}\\n\\n`."""
    chunk: dict[str, Any] = {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": []
        if delta is None and finish_reason is None
        else [{"index": 0, "delta": delta or {}, "finish_reason": finish_reason, "logprobs": None}],
    }
    if usage is not None:
        chunk["usage"] = usage_body(usage)
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


DONE_EVENT = b"data: [DONE]\n\n"

# OpenAI's error `type` per HTTP status (the `openai` client picks its exception by status; the
# type and code are what a caller's handler reads).
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def error_body(status: int, message: str, code: str) -> dict[str, Any]:
    """`{"error": {"message", "type", "param", "code"}}`, the shape OpenAI clients parse."""
    kind = _ERROR_TYPES.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def error_event(status: int, message: str, code: str) -> bytes:
    """An error in the middle of a stream: the `openai` client raises `APIError` on an event with an
    `error` member."""
    return b"data: " + orjson.dumps(error_body(status, message, code)) + b"\n\n"
