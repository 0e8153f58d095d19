"""Output policy: the answer says no more than the caller's grant allows, whatever it asks for.

| policy            | outputs                 | what the scores are                                  |
|-------------------|-------------------------|------------------------------------------------------|
| `label`           | label                   | none                                                 |
| `top_k`           | label, top_k            | none: the k most likely classes, best first          |
| `dp_scores`       | label, probabilities    | DP noise (budgeted); the label is the noisy argmax   |
| `reverse_sigmoid` | label, probabilities    | perturbed, argmax kept                               |
| `rounded`         | label, probabilities    | rounded to `decimals`                                |
| `probabilities`   | label, probabilities    | as computed                                          |

A regressor answers one `value` per row, under `rounded`, `dp_scores` (noise calibrated to the
manifest's declared `value_range`, clamped to it) or `probabilities` (as computed); a policy
made for classes (`label`, `top_k`, `reverse_sigmoid`, `private_prediction`) is refused with
403 `policy_not_applicable` rather than guessed at.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from bastion.config import Grant, OutputDetail
from bastion.context import RequestContext
from bastion.errors import ErrorCode, PermissionDenied, RateLimited, SchemaViolation
from bastion.privacy import AnswerCache, NoiseSource, dp_scores, dp_values, policy_tag, reverse_sigmoid
from bastion.protocol import encode_infer_response
from bastion.stages.inference import run_model
from bastion.state import EVERYONE, BudgetKey, StateStore

LABEL = "label"
TOP_K = "top_k"
PROBABILITIES = "probabilities"
VALUE = "value"
_OUTPUTS = {
    OutputDetail.PRIVATE_PREDICTION: [LABEL],
    OutputDetail.LABEL: [LABEL],
    OutputDetail.TOP_K: [LABEL, TOP_K],
}
ALL_OUTPUTS = (LABEL, TOP_K, PROBABILITIES)


def output_names(detail: OutputDetail, *, regression: bool = False) -> list[str]:
    if regression:
        return [VALUE] if detail.applies_to_regression else []
    return _OUTPUTS.get(detail, [LABEL, PROBABILITIES])


def check_applicable(detail: OutputDetail, *, regression: bool) -> None:
    if regression and not detail.applies_to_regression:
        raise PermissionDenied(
            f"output policy {detail.value!r} is made for classes and does not apply to a regression "
            "model: grant rounded, dp_scores or probabilities for it",
            code=ErrorCode.POLICY_NOT_APPLICABLE,
        )


def describe_policy(detail: OutputDetail, params: Grant) -> dict[str, Any]:
    """What the metadata endpoint tells a caller about the answers it will get."""
    info: dict[str, Any] = {"output_policy": detail.value}
    if detail is OutputDetail.TOP_K:
        info["top_k"] = params.top_k
    elif detail is OutputDetail.ROUNDED:
        info["decimals"] = params.decimals
    elif detail is OutputDetail.REVERSE_SIGMOID:
        info |= {"beta": params.beta, "gamma": params.gamma}
    elif detail is OutputDetail.PRIVATE_PREDICTION:
        info |= {
            "sigma": params.sigma,
            "rho_per_row": rho_per_row(params.sigma),
            "privacy_budget_rho": params.privacy_budget,
            "global_privacy_budget_rho": params.global_privacy_budget,
            "budget_window_seconds": params.budget_window_seconds,
        }
    elif detail is OutputDetail.DP_SCORES:
        info |= {
            "mechanism": params.mechanism,
            "epsilon_per_row": params.epsilon,
            "privacy_budget": params.privacy_budget,
            "budget_window_seconds": params.budget_window_seconds,
        }
        if params.global_privacy_budget is not None:
            info["global_privacy_budget"] = params.global_privacy_budget
        if params.mechanism == "gaussian":
            info["delta"] = params.delta
    return info


def rho_per_row(sigma: float) -> float:
    """zCDP cost of one Gaussian noisy-max answer: one teacher changing its vote moves the vote
    histogram by sqrt(2) in L2, so rho = 2 / (2 sigma^2)."""
    return 1.0 / sigma**2


EPSILON = "epsilon"  # dp_scores and aggregates: pure DP, composed additively
RHO = "rho"  # private prediction: zCDP, composed additively (not comparable with epsilon)


# The model's global budget for a unit, as (limit, window in seconds), or None: what the policy's
# grants that set `global_privacy_budget` on the model say (`Policy.global_budget`).
GlobalBudgets = Callable[[str, str], "tuple[float, float] | None"]


def grant_global_budget(params: Grant) -> tuple[float, float] | None:
    """The global budget the grant itself sets, as (limit, window)."""
    if params.global_privacy_budget is None:
        return None
    return params.global_privacy_budget, params.budget_window_seconds


def budget_keys(
    principal: str, model: str, unit: str, params: Grant, shared: tuple[float, float] | None = None
) -> tuple[BudgetKey, BudgetKey | None]:
    """The principal's ledger row for this model and unit, and the global one all principals share.

    `shared`: the model's global budget (limit, window) from the whole policy; None takes the grant's
    own (None when it sets no `global_privacy_budget`). A grant without one still spends the model's
    global row when another grant sets it: a global budget counts every principal's answers."""
    mine = BudgetKey.for_model(principal, model, unit, params.budget_window_seconds)
    shared = shared or grant_global_budget(params)
    return mine, None if shared is None else BudgetKey.for_model(EVERYONE, model, unit, shared[1])


async def remaining_budgets(
    store: StateStore,
    principal: str,
    model: str,
    unit: str,
    params: Grant,
    *,
    now: float,
    shared: tuple[float, float] | None = None,
) -> dict[str, float]:
    """What is left of the caller's budget (and the model's global one) in the window, spending nothing."""
    mine, shared_row = budget_keys(principal, model, unit, params, shared)
    left = {
        "privacy_budget_remaining": (
            await store.spend_budget(mine, cost=0.0, limit=params.privacy_budget, now=now)
        ).remaining
    }
    shared = shared or grant_global_budget(params)
    if shared_row is not None and shared is not None:
        spend = await store.spend_budget(shared_row, cost=0.0, limit=shared[0], now=now)
        left["global_privacy_budget_remaining"] = spend.remaining
    return left


async def charge(
    store: StateStore,
    principal: str,
    model: str,
    cost: float,
    params: Grant,
    *,
    unit: str,
    now: float,
    on_global_spend: Callable[[str, str, float], None] = lambda model, unit, remaining: None,
    shared_budget: tuple[float, float] | None = None,
) -> BudgetKey:
    """Spend `cost` of the principal's budget, then of the global one, or neither: raise 429
    privacy_budget_exhausted. Returns the principal's row (it keys the answer cache too).
    `shared_budget`: the model's global budget (see `budget_keys`)."""
    mine, shared = budget_keys(principal, model, unit, params, shared_budget)
    limit = shared_budget or grant_global_budget(params)
    spend = await store.spend_budget(mine, cost=cost, limit=params.privacy_budget, now=now)
    if not spend.allowed:
        raise _exhausted(cost, spend.remaining, spend.retry_after, unit)
    if shared is not None:
        assert limit is not None
        together = await store.spend_budget(shared, cost=cost, limit=limit[0], now=now)
        if not together.allowed:  # give the principal its share back: nothing was answered
            await store.spend_budget(mine, cost=-cost, limit=params.privacy_budget, now=now)
            raise _exhausted(cost, together.remaining, together.retry_after, f"{unit} (global)")
        on_global_spend(model, unit, together.remaining)
    return mine


class PrivateScores:
    """DP answers: the keyed cache first (no budget spent twice), then the budget, then the noise."""

    def __init__(
        self,
        store: StateStore,
        noise: NoiseSource,
        cache: AnswerCache,
        global_budgets: GlobalBudgets = lambda model, unit: None,
    ) -> None:
        """`global_budgets`: the model's global budget per unit from the whole policy (the service's
        current one), so that every grant's answers on the model count toward it."""
        self._store = store
        self.noise = noise
        self.cache = cache
        self.global_budgets = global_budgets
        self.on_global_spend: Callable[[str, str, float], None] = lambda model, unit, remaining: None

    async def release(
        self,
        ctx: RequestContext,
        params: Grant,
        *,
        unit: str,
        policy: str,
        cost: float,
        compute: Callable[[], np.ndarray],
    ) -> tuple[np.ndarray, float]:
        """One DP release (dp_scores, PATE, aggregates) through the keyed answer cache.

        The same question, from the same budget row, under the same policy, gets the same answer and
        spends nothing (averaging repeated answers learns nothing). Otherwise `compute()` (the models
        and the noise, which can fail) runs first and `cost` (in `unit`) is charged after it, so that
        nothing that can fail runs after the spend. Returns (answer, spent).
        Raises RateLimited 429 `privacy_budget_exhausted` (then the answer is discarded, unreleased).
        """
        principal, model = ctx.principal, ctx.model
        assert principal is not None and model is not None and ctx.payload_hmac is not None
        row, _ = budget_keys(principal.id, model.name, unit, params)
        key = self.cache.key(row, model.digest, ctx.payload_hmac, policy)
        cached = self.cache.get(key, now=ctx.now)
        if cached is not None:
            return cached, 0.0
        released = compute()
        await charge(
            self._store,
            principal.id,
            model.name,
            cost,
            params,
            unit=unit,
            now=ctx.now,
            on_global_spend=self.on_global_spend,
            shared_budget=self.global_budgets(model.name, unit),
        )
        self.cache.put(key, released, expires=ctx.now + params.budget_window_seconds)
        return released, cost

    async def private_prediction(self, ctx: RequestContext, params: Grant) -> np.ndarray:
        """PATE: Gaussian noise on the teachers' vote counts; the caller sees only the noisy argmax."""
        model, request, principal = ctx.model, ctx.request, ctx.principal
        assert (
            model is not None
            and request is not None
            and principal is not None
            and ctx.payload_hmac is not None
        )
        if model.teachers is None:
            raise PermissionDenied(
                "private prediction needs a bundle packed with --teachers",
                code=ErrorCode.PRIVATE_PREDICTION_UNAVAILABLE,
            )
        # The teachers (runtimes that can fail) vote and the noise is drawn before the charge.
        teachers, inputs = model.teachers, request.inputs
        noisy, ctx.rho_spent = await self.release(
            ctx,
            params,
            unit=RHO,
            policy=policy_tag("pate", params.sigma),
            cost=rho_per_row(params.sigma) * request.rows,
            compute=lambda: self.noise.gaussian(run_model(ctx, lambda: teachers.votes(inputs)), params.sigma),
        )
        return noisy

    async def answer(self, ctx: RequestContext, prediction: np.ndarray, params: Grant) -> np.ndarray:
        assert ctx.model is not None
        value_range = ctx.model.manifest.outputs.value_range

        def noisy() -> np.ndarray:
            if value_range is not None:
                return dp_values(
                    prediction,
                    value_range=value_range,
                    mechanism=params.mechanism,
                    epsilon=params.epsilon,
                    delta=params.delta,
                    noise=self.noise,
                )
            return dp_scores(
                prediction,
                mechanism=params.mechanism,
                epsilon=params.epsilon,
                delta=params.delta,
                noise=self.noise,
            )

        scores, ctx.epsilon_spent = await self.release(
            ctx,
            params,
            unit=EPSILON,
            policy=policy_tag("dp_scores", params.mechanism, params.epsilon, params.delta),
            cost=params.epsilon * prediction.shape[0],
            compute=noisy,
        )
        return scores


def _exhausted(cost: float, remaining: float, retry_after: float, unit: str) -> RateLimited:
    return RateLimited(
        f"privacy budget exhausted: this answer costs {unit} {cost:g}, {remaining:g} left in the window",
        retry_after=retry_after,
        code=ErrorCode.PRIVACY_BUDGET_EXHAUSTED,
    )


class ShapeOutput:
    def __init__(self, private: PrivateScores | None = None) -> None:
        self._private = private

    async def __call__(self, ctx: RequestContext) -> None:
        model, request, proba, grant = ctx.model, ctx.request, ctx.prediction, ctx.grant
        assert model is not None and request is not None and proba is not None and grant is not None
        detail = ctx.output_detail
        assert detail is not None
        params = grant.output_params
        regression = model.manifest.outputs.is_regression
        check_applicable(detail, regression=regression)
        allowed = output_names(detail, regression=regression)
        wanted = request.requested_outputs or allowed
        for name in wanted:
            if name not in ((VALUE,) if regression else ALL_OUTPUTS):
                raise SchemaViolation(
                    f"output {name[:64]!r} is not an output of this model", code=ErrorCode.UNKNOWN_OUTPUT
                )
            if name not in allowed:
                raise PermissionDenied(f"output {name!r} is not granted", code=ErrorCode.OUTPUT_NOT_GRANTED)
        scores = await self._scores(ctx, np.asarray(proba, dtype=np.float64), detail, params)
        if regression:
            value = {
                "name": VALUE,
                "datatype": "FP64",
                "shape": [len(scores)],
                "data": scores.ravel().tolist(),
            }
            ctx.result = encode_infer_response(
                model=model.name, version=model.version, request_id=request.id, outputs=[value]
            )
            return
        classes = model.manifest.outputs.classes
        assert classes is not None
        order = np.argsort(-scores, axis=1, kind="stable")
        outputs: list[dict[str, Any]] = []
        if LABEL in wanted:
            outputs.append(
                {
                    "name": LABEL,
                    "datatype": "BYTES",
                    "shape": [len(order)],
                    "data": [classes[i] for i in order[:, 0]],
                }
            )
        if TOP_K in wanted:
            k = min(params.top_k, len(classes))
            outputs.append(
                {
                    "name": TOP_K,
                    "datatype": "BYTES",
                    "shape": [len(order), k],
                    "data": [classes[i] for i in order[:, :k].ravel()],
                }
            )
        if PROBABILITIES in wanted:
            outputs.append(
                {
                    "name": PROBABILITIES,
                    "datatype": "FP32",
                    "shape": list(scores.shape),
                    "data": scores.astype(np.float32).ravel().tolist(),
                }
            )
        ctx.result = encode_infer_response(
            model=model.name, version=model.version, request_id=request.id, outputs=outputs
        )

    async def _scores(
        self, ctx: RequestContext, proba: np.ndarray, detail: OutputDetail, params: Grant
    ) -> np.ndarray:
        if detail is OutputDetail.PRIVATE_PREDICTION:
            if self._private is None:
                raise PermissionDenied(
                    "private prediction is not available on this server", code=ErrorCode.DP_UNAVAILABLE
                )
            return await self._private.private_prediction(ctx, params)
        if detail is OutputDetail.DP_SCORES:
            if self._private is None:
                raise PermissionDenied(
                    "differential privacy is not available on this server", code=ErrorCode.DP_UNAVAILABLE
                )
            return await self._private.answer(ctx, proba, params)
        if detail is OutputDetail.REVERSE_SIGMOID:
            return reverse_sigmoid(proba, beta=params.beta, gamma=params.gamma)
        if detail is OutputDetail.ROUNDED:
            return np.round(proba, params.decimals)
        return proba
