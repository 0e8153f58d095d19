"""The OpenAI chat codec: strict as its OpenAPI schema, errors that name the field and never the value."""

from __future__ import annotations

import json
from typing import Any

import pytest

from bastion.errors import BadRequest
from bastion.llm.protocol import chunk_event, decode_chat_request, error_body
from bastion.llm.types import ChatMessage


def _body(**extra: Any) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}).encode()


def test_a_request_as_the_openai_client_sends_it() -> None:
    request = decode_chat_request(
        _body(
            messages=[
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            ],
            max_completion_tokens=7.0,
            stop="END",
            stream=True,
            stream_options={"include_usage": True},
            seed=3,
            user="u-1",
        )
    )
    assert request.messages == (ChatMessage("system", "be brief"), ChatMessage("user", "ab"))
    assert (request.max_tokens, request.stop, request.stream, request.include_usage) == (
        7,
        ("END",),
        True,
        True,
    )
    assert request.temperature is None and request.top_p is None  # left to the model's policy


@pytest.mark.parametrize(
    ("extra", "code", "field"),
    [
        ({"max_tokens": "5"}, "malformed_request", "max_tokens"),
        ({"max_tokens": 5.5}, "malformed_request", "max_tokens"),
        ({"stream": 1}, "malformed_request", "stream"),
        ({"temperature": "1"}, "malformed_request", "temperature"),
        ({"seed": 2**64}, "malformed_request", "seed"),
        ({"n": 2}, "malformed_request", "n"),
        ({"stop": ["a"] * 5}, "malformed_request", "stop"),
        ({"stop": ""}, "malformed_request", "stop"),
        ({"tools": []}, "unsupported_parameter", "tools"),
        ({"logprobs": True}, "unsupported_parameter", "logprobs"),
        ({"response_format": {"type": "json_object"}}, "unsupported_parameter", "response_format"),
        ({"max_tokens": 3, "max_completion_tokens": 3}, "malformed_request", "max_tokens"),
        ({"stream_options": {"include_usage": True}}, "malformed_request", "stream_options"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "malformed_request",
            "messages.0.content",
        ),
        ({"messages": [{"role": "tool", "content": "x"}]}, "malformed_request", "messages.0.role"),
    ],
)
def test_refusals_name_the_field_not_the_union_member_and_never_the_value(
    extra: dict[str, Any], code: str, field: str
) -> None:
    with pytest.raises(BadRequest) as refused:
        decode_chat_request(_body(**extra))
    assert refused.value.code == code
    message = refused.value.message
    assert message.startswith(field), message
    assert ".str" not in message and "list[" not in message
    for value in ("image_url", "json_object", "'5'"):
        assert value not in message


def test_errors_and_chunks_have_openais_shape() -> None:
    assert error_body(429, "over", "token_budget_exhausted") == {
        "error": {
            "message": "over",
            "type": "rate_limit_error",
            "param": None,
            "code": "token_budget_exhausted",
        }
    }
    event = chunk_event("r1", "m", 5, delta={"role": "assistant", "content": ""})
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    chunk = json.loads(event[6:])
    assert chunk["object"] == "chat.completion.chunk" and chunk["choices"][0]["delta"]["role"] == "assistant"
