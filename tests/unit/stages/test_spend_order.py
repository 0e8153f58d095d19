"""No path charges a privacy budget and then fails: what can fail (the runtime, the noise) runs first.

The failure is a real one of PATE teachers: a teacher trained on a slice of the data that never saw
a category raises on it, while the full model (and the input guard) accept the row."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder

from bastion.config import Action, Grant, OutputDetail
from bastion.context import InferRequest, Principal, RequestContext
from bastion.errors import RateLimited
from bastion.manifest import InputSpec, Manifest, OutputSpec
from bastion.privacy import AnswerCache
from bastion.registry import ServedModel
from bastion.runtimes.sklearn import SklearnRuntime
from bastion.runtimes.teachers import TeacherEnsemble
from bastion.stages.inference import ModelFailed
from bastion.stages.output_policy import PrivateScores, rho_per_row
from bastion.state import MemoryStateStore

SPEC = InputSpec(name="c", datatype="INT64", shape=[-1, 1], categories=[0, 1, 2])
MANIFEST = Manifest(
    name="m",
    version="1",
    runtime="sklearn",
    file="m.skops",
    inputs=[SPEC],
    outputs=OutputSpec(classes=["a", "b"]),
)


class NoNoise:
    resolution = 0.0

    def laplace(self, values: np.ndarray, scale: float) -> np.ndarray:
        return values

    def gaussian(self, values: np.ndarray, scale: float) -> np.ndarray:
        return values


def _teacher(categories: list[int]) -> SklearnRuntime:
    x = np.array([[c] for c in categories for _ in range(5)])
    y = np.array([c % 2 for c in categories for _ in range(5)])
    estimator = make_pipeline(OneHotEncoder(handle_unknown="error"), LogisticRegression()).fit(x, y)
    return SklearnRuntime(estimator, ["c"], regression=False)


def _ctx(category: int, teachers: TeacherEnsemble) -> RequestContext:
    async def read(limit: int) -> bytes:
        return b""

    ctx = RequestContext(
        "r",
        Action.INFER,
        100.0,
        None,
        read,
    )
    ctx.principal = Principal("k1", ("r",))
    ctx.model = ServedModel(MANIFEST, _teacher([0, 1, 2]), "sha256:x", teachers)
    ctx.request = InferRequest(None, {"c": np.array([[category]], dtype=np.int64)}, None, {}, 1)
    ctx.payload_hmac = f"h{category}"
    return ctx


def test_a_teacher_that_fails_costs_the_caller_nothing() -> None:
    # Two teachers never saw category 2: they raise on it (the full model does not).
    ensemble = TeacherEnsemble([_teacher([0, 1]), _teacher([0, 1]), _teacher([0, 1, 2])], 2)
    private = PrivateScores(MemoryStateStore(), NoNoise(), AnswerCache())
    params = Grant(
        models=["m"],
        actions=[Action.INFER],
        output=OutputDetail.PRIVATE_PREDICTION,
        sigma=2.0,
        privacy_budget=rho_per_row(2.0),  # exactly one answer
    )

    async def run() -> None:
        for _ in range(3):
            # The teachers' failure is the server's (500 inference_failed, canary evidence), and the
            # library's message, which quotes the input, goes nowhere.
            failing = _ctx(2, ensemble)
            with pytest.raises(ModelFailed) as failed:
                await private.private_prediction(failing, params)
            assert failed.value.status == 500 and "categor" not in failed.value.message
            assert failing.runtime_failed
        # The budget is whole: the one answer it pays for is still there, and then it is spent.
        assert (await private.private_prediction(_ctx(0, ensemble), params)).shape == (1, 2)
        with pytest.raises(RateLimited):
            await private.private_prediction(_ctx(1, ensemble), params)

    asyncio.run(run())
