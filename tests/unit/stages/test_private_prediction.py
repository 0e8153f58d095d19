"""Private prediction's accounting, with injected noise and a stub teacher ensemble."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from bastion.config import Action, Grant, OutputDetail
from bastion.context import InferRequest, Principal, RequestContext
from bastion.errors import PermissionDenied, RateLimited
from bastion.manifest import InputSpec, Manifest, OutputSpec
from bastion.privacy import AnswerCache
from bastion.registry import ServedModel
from bastion.runtimes.teachers import TeacherEnsemble
from bastion.stages.output_policy import RHO, PrivateScores, budget_keys, rho_per_row
from bastion.state import EVERYONE, MemoryStateStore


class Fixed:
    def __init__(self, cls: int) -> None:
        self.cls = cls

    def predict(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        rows = next(iter(inputs.values())).shape[0]
        out = np.zeros((rows, 3))
        out[:, self.cls] = 1.0
        return out


class NoNoise:
    resolution = 0.0

    def laplace(self, values: np.ndarray, scale: float) -> np.ndarray:
        return values

    def gaussian(self, values: np.ndarray, scale: float) -> np.ndarray:
        return values


MANIFEST = Manifest(
    name="m",
    version="1",
    runtime="sklearn",
    file="m.skops",
    inputs=[InputSpec(name="x", datatype="FP32", shape=[-1, 2])],
    outputs=OutputSpec(classes=["a", "b", "c"]),
)


def _ctx(teachers: TeacherEnsemble | None, who: str = "k1", row: float = 0.0) -> RequestContext:
    async def read(limit: int) -> bytes:
        return b""

    ctx = RequestContext(
        "r",
        Action.INFER,
        100.0,
        None,
        read,
    )
    ctx.principal = Principal(who, ("r",))
    ctx.model = ServedModel(MANIFEST, Fixed(0), "sha256:x", teachers)
    ctx.request = InferRequest(None, {"x": np.array([[row, 1.0]], dtype=np.float32)}, None, {}, 1)
    ctx.payload_hmac = f"h{row}"
    return ctx


def test_votes_and_budgets() -> None:
    ensemble = TeacherEnsemble([Fixed(1), Fixed(1), Fixed(2)], 3)
    np.testing.assert_array_equal(ensemble.votes({"x": np.zeros((2, 2))}), [[0, 2, 1], [0, 2, 1]])
    store = MemoryStateStore()
    private = PrivateScores(store, NoNoise(), AnswerCache())
    seen: list[float] = []
    private.on_global_spend = lambda model, unit, left: seen.append(left)
    params = Grant(
        models=["m"],
        actions=[Action.INFER],
        output=OutputDetail.PRIVATE_PREDICTION,
        sigma=2.0,
        privacy_budget=0.5,
        global_privacy_budget=0.75,
    )
    assert rho_per_row(2.0) == 0.25

    async def run() -> None:
        noisy = await private.private_prediction(_ctx(ensemble, "k1", 1.0), params)
        assert noisy.argmax(axis=1).tolist() == [1]  # the teachers' consensus
        await private.private_prediction(_ctx(ensemble, "k1", 2.0), params)  # k1 has spent 0.5: all of it
        with pytest.raises(RateLimited, match=r"rho 0.25, 0 left"):
            await private.private_prediction(_ctx(ensemble, "k1", 3.0), params)
        assert (
            await private.private_prediction(_ctx(ensemble, "k1", 1.0), params)
        ) is not None  # cached: free
        await private.private_prediction(_ctx(ensemble, "k2", 4.0), params)  # global: 0.75 spent
        with pytest.raises(RateLimited, match="global"):
            await private.private_prediction(_ctx(ensemble, "k2", 5.0), params)
        # The refused global spend gave k2 its share back: k2 has spent only 0.25 of its 0.5.
        mine, shared = budget_keys("key:k2", "m", RHO, params)
        assert shared is not None and shared.principal == EVERYONE and mine.scope == shared.scope == "m/rho"
        left = await store.spend_budget(mine, cost=0.0, limit=0.5, now=100.0)
        assert left.remaining == pytest.approx(0.25)
        g = await store.spend_budget(shared, cost=0.0, limit=0.75, now=100.0)
        assert g.remaining == pytest.approx(0.0)

    asyncio.run(run())
    assert seen == pytest.approx([0.5, 0.25, 0.0])


def test_model_without_teachers_is_refused() -> None:
    private = PrivateScores(MemoryStateStore(), NoNoise(), AnswerCache())
    params = Grant(models=["m"], actions=[Action.INFER], output=OutputDetail.PRIVATE_PREDICTION)
    with pytest.raises(PermissionDenied, match="--teachers"):
        asyncio.run(private.private_prediction(_ctx(None), params))
