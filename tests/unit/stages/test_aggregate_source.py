"""The aggregate route refuses a model without aggregates before it reads or decodes anything."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from bastion.config import Action
from bastion.context import RequestContext
from bastion.errors import PermissionDenied
from bastion.stages.aggregates import AggregateSource


def test_a_model_without_aggregates_is_refused_before_the_body_is_read() -> None:
    read: list[int] = []

    async def read_body(limit: int) -> bytes:
        read.append(limit)
        return b'{"inputs": []}'

    ctx = RequestContext(
        request_id="r", action=Action.AGGREGATE, now=0.0, credentials=None, read_body=read_body
    )
    model: Any = SimpleNamespace(name="m", aggregates=False, reference=None)
    ctx.model = model
    with pytest.raises(PermissionDenied) as refused:
        asyncio.run(AggregateSource(1024)(ctx))
    assert refused.value.code == "aggregates_disabled"
    assert read == [] and ctx.request is None


@pytest.mark.parametrize(
    "body",
    [
        b'{"reference": true, "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [1]}]}',
        b'{"reference": true, "id": "a"}',
        b'{"inputs": [], "reference": true}',
    ],
)
def test_reference_with_anything_beside_it_is_refused_not_ignored(body: bytes) -> None:
    """Red team #9 F12: `{"reference": true, "inputs": [...]}` answered (and charged) the statistics of
    the reference set, the caller's inputs silently ignored."""
    import numpy as np

    from bastion.errors import BadRequest

    async def read_body(limit: int) -> bytes:
        return body

    ctx = RequestContext(
        request_id="r", action=Action.AGGREGATE, now=0.0, credentials=None, read_body=read_body
    )
    model: Any = SimpleNamespace(name="m", aggregates=True, reference={"x": np.zeros((3, 1))}, digest="d")
    ctx.model = model
    with pytest.raises(BadRequest) as refused:
        asyncio.run(AggregateSource(1024)(ctx))
    assert refused.value.code == "malformed_request"
    assert ctx.request is None
