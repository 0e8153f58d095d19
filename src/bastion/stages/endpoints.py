"""The last stage of the non-inference routes: each produces the response body."""

from __future__ import annotations

from typing import Any

from bastion import __version__
from bastion.breaker import ModelGuards
from bastion.config import Action, OutputDetail
from bastion.context import RequestContext
from bastion.errors import (
    BadRequest,
    ErrorCode,
    MethodNotAllowed,
    ModelCircuitOpen,
    NotFound,
    PermissionDenied,
)
from bastion.incidents import IncidentRecords
from bastion.metrics import Metrics
from bastion.policy import EffectiveGrant, Policy, TokenScope, serves_claim
from bastion.protocol import integral, parse_json
from bastion.registry import ModelRegistry
from bastion.stages.output_policy import (
    EPSILON,
    LABEL,
    PROBABILITIES,
    RHO,
    TOP_K,
    VALUE,
    GlobalBudgets,
    describe_policy,
    output_names,
    remaining_budgets,
)
from bastion.state import StateStore
from bastion.tokens import TokenAuthority

_MAX_TOKEN_REQUEST = 4096


class DescribeServer:
    async def __call__(self, ctx: RequestContext) -> None:
        # binary_tensor_data: Triton's name for the binary extension, which its clients look for.
        extensions = ["bastion_auth", "binary_tensor_data"]
        ctx.result = {"name": "bastion", "version": __version__, "extensions": extensions}


class DescribeModel:
    """V2 model metadata, plus what this caller will get back (`parameters`)."""

    def __init__(
        self,
        registry: ModelRegistry,
        store: StateStore | None = None,
        global_budgets: GlobalBudgets | None = None,
    ) -> None:
        """`global_budgets`: the model's global budget from the whole policy (also for a grant without one)."""
        self._registry = registry
        self._store = store
        self._global_budgets = global_budgets

    async def _remaining(self, ctx: RequestContext, grant: EffectiveGrant) -> dict[str, float]:
        """What is left of the caller's privacy budget (and the model's global one), spending nothing."""
        params, model = grant.output_params, ctx.model
        if self._store is None or ctx.principal is None or model is None:
            return {}
        if grant.output not in (OutputDetail.DP_SCORES, OutputDetail.PRIVATE_PREDICTION):
            return {}
        unit = RHO if grant.output is OutputDetail.PRIVATE_PREDICTION else EPSILON
        shared = self._global_budgets(model.name, unit) if self._global_budgets is not None else None
        return await remaining_budgets(
            self._store, ctx.principal.id, model.name, unit, params, now=ctx.now, shared=shared
        )

    async def __call__(self, ctx: RequestContext) -> None:
        model, grant = ctx.model, ctx.grant
        assert model is not None and grant is not None
        # Metadata describes what this caller's infer requests get: the infer grant, not the metadata
        # grant (whose output detail and parameters never apply to an answer).
        grant = grant.for_action(Action.INFER)
        m = model.manifest
        regression = m.outputs.is_regression
        if regression:
            every = [{"name": VALUE, "datatype": "FP64", "shape": [-1]}]
            kind: dict[str, Any] = {"value_range": list(m.outputs.value_range or ())}
        else:
            n_classes = m.outputs.width
            every = [
                {"name": LABEL, "datatype": "BYTES", "shape": [-1]},
                {
                    "name": TOP_K,
                    "datatype": "BYTES",
                    "shape": [-1, min(grant.output_params.top_k, n_classes)],
                },
                {"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, n_classes]},
            ]
            kind = {"classes": m.outputs.classes}
        # Only the outputs this caller's answers carry (the same function decides both).
        granted = [] if grant.output is None else output_names(grant.output, regression=regression)
        outputs = [o for o in every if o["name"] in granted]
        inputs: list[dict[str, Any]] = []
        for spec in m.inputs:
            entry: dict[str, Any] = {"name": spec.name, "datatype": spec.datatype, "shape": spec.shape}
            entry["parameters"] = {"sensitive": spec.sensitive}
            inputs.append(entry)
        ctx.result = {
            "name": m.name,
            "versions": sorted(v.version for v in self._registry.models() if v.name == m.name),
            "platform": {"onnx": "onnxruntime_onnx", "sklearn": "sklearn_skops"}[m.runtime],
            "inputs": inputs,
            "outputs": outputs,
            "parameters": {
                "version": m.version,
                "digest": model.digest,
                **kind,
                "granted_outputs": granted,
                "granted_actions": sorted(a.value for a in grant.actions),
                **(
                    {"output_policy": None}
                    if grant.output is None
                    else describe_policy(grant.output, grant.output_params)
                ),
                **(await self._remaining(ctx, grant)),
                "sensitive_inputs_granted": grant.sensitive_inputs,
            },
        }


class ModelReadiness:
    """Ready unless the version's circuit breaker is open: then 503 model_circuit_open with
    Retry-After, as an inference request would get."""

    def __init__(self, guards: ModelGuards | None = None) -> None:
        self._guards = guards

    async def __call__(self, ctx: RequestContext) -> None:
        model = ctx.model
        assert model is not None
        if self._guards is not None:
            guarded = self._guards.get(model.name, model.version, model.digest, model.breaker)
            left = guarded.breaker.open_for()
            if left is not None:
                raise ModelCircuitOpen(max(left, 1.0))
        ctx.result = {"name": model.name, "version": model.version, "ready": True}


class ExportMetrics:
    def __init__(self, metrics: Metrics, incidents: IncidentRecords | None = None) -> None:
        self._metrics = metrics
        self._incidents = incidents

    async def __call__(self, ctx: RequestContext) -> None:
        if self._incidents is not None:  # read when scraped: the CLI changes incidents too
            for state, count in self._incidents.counts().items():
                self._metrics.incident_states.labels(state).set(count)
        ctx.result_text = self._metrics.render()


class DescribeApi:
    async def __call__(self, ctx: RequestContext) -> None:
        from bastion.openapi import OPENAPI

        ctx.result = OPENAPI


class RouteNotFound:
    async def __call__(self, ctx: RequestContext) -> None:
        raise NotFound("no such route", code=ErrorCode.ROUTE_NOT_FOUND)


class WrongMethod:
    async def __call__(self, ctx: RequestContext) -> None:
        allowed = ctx.allowed_methods or ""
        raise MethodNotAllowed(f"use {allowed or 'another method'} on this path", allowed=allowed)


class IssueToken:
    """Exchange an API key for a short-lived token whose scope can only narrow the key's grants."""

    def __init__(self, tokens: TokenAuthority, policy: Policy, registry: ModelRegistry | None = None) -> None:
        self._tokens = tokens
        self._policy = policy
        self._registry = registry  # to refuse a class policy claimed for a regressor by name

    async def __call__(self, ctx: RequestContext) -> None:
        principal = ctx.principal
        assert principal is not None
        body = await ctx.read_body(_MAX_TOKEN_REQUEST)
        doc = parse_json(body) if body.strip() else {}
        if not isinstance(doc, dict) or set(doc) - {"scope", "output", "ttl_seconds"}:
            raise BadRequest(
                "token request takes 'scope', 'output' and 'ttl_seconds'", code=ErrorCode.MALFORMED_REQUEST
            )
        scope = self._scope(doc.get("scope", ["infer:*", "metadata:*"]), principal.roles, doc.get("output"))
        ttl = integral(doc.get("ttl_seconds"))  # 60.0 is the integer 60, as JSON Schema reads it
        longest = self._tokens.default_ttl
        if ttl is not None and (not isinstance(ttl, int) or isinstance(ttl, bool) or not 1 <= ttl <= 86_400):
            raise BadRequest(
                "'ttl_seconds' must be an integer from 1 to 86400", code=ErrorCode.MALFORMED_REQUEST
            )
        if ttl is not None and ttl > longest:  # asking for more than the server grants: refused, not cut
            raise PermissionDenied(
                f"'ttl_seconds' may be at most {longest} (tokens.ttl_seconds)", code=ErrorCode.TTL_NOT_GRANTED
            )
        minted = self._tokens.mint(key_id=principal.key_id, scope=scope, now=ctx.now, ttl=ttl)
        # The jti is the token's public name: its owner reads it here, the audit log keeps it (never
        # the token), and an admin revokes the token by it (`bastion tokens revoke`).
        ctx.operation = (f"token:{minted.jti}", "issued")
        ctx.result = {
            "access_token": minted.token,
            "token_type": "Bearer",
            "expires_in": minted.expires_in,
            "expires_at": minted.expires_at,
            "jti": minted.jti,
            "scope": scope.encode(),
        }

    def _scope(self, items: Any, roles: tuple[str, ...], output: Any) -> TokenScope:
        if not isinstance(items, list) or not items or not all(isinstance(i, str) for i in items):
            raise BadRequest(
                "'scope' must be a non-empty list of 'action:model' strings", code=ErrorCode.MALFORMED_REQUEST
            )
        detail = None
        if output is not None:
            try:
                detail = OutputDetail(output) if isinstance(output, str) else None
            except ValueError:
                detail = None
            if detail is None:
                names = ", ".join(d.value for d in OutputDetail)
                raise BadRequest(f"'output' must be one of: {names}", code=ErrorCode.MALFORMED_REQUEST)
        pairs = set()
        for item in items:
            action_name, sep, model = item.partition(":")
            try:
                action = Action(action_name)
            except ValueError:
                raise BadRequest(
                    f"unknown action in scope {item[:80]!r}", code=ErrorCode.MALFORMED_REQUEST
                ) from None
            if not sep or not model:
                raise BadRequest(
                    f"scope {item[:80]!r} must read 'action:model'", code=ErrorCode.MALFORMED_REQUEST
                )
            # A wildcard pair narrows to the key's own grants (a token's grant is always the intersection),
            # but asking for an action the key holds nowhere is refused outright.
            granted = (
                self._policy.grants_anywhere(roles, action)
                if model == "*"
                else self._policy.grant(roles, model).allows(action)
            )
            if not granted:
                raise PermissionDenied(
                    f"scope {item[:80]!r} is not granted to this key", code=ErrorCode.SCOPE_NOT_GRANTED
                )
            # The output claim narrows too, and only to what the key's own infer grant can serve with its
            # own parameters (`serves_claim`): anything else is refused, never issued and then served with
            # parameters no grant set, nor quietly ignored. The claim caps infer answers (which metadata
            # describes), so it is checked against the key's infer grant on the pair's model; on a
            # wildcard, against each of its infer grants anywhere.
            if detail is not None:
                if model == "*":
                    outputs = self._policy.outputs_of(roles, Action.INFER)
                else:
                    infer = self._policy.grant(roles, model).for_action(Action.INFER).output
                    outputs = frozenset() if infer is None else frozenset({infer})
                if model != "*" and self._regression_only(model) and not detail.applies_to_regression:
                    outputs = frozenset()  # a regressor has no classes to label: nothing would be served
                if not any(serves_claim(o, detail) for o in outputs):
                    raise PermissionDenied(
                        f"output {detail.value!r} is not one this key's grant serves for {item[:80]!r}",
                        code=ErrorCode.OUTPUT_NOT_GRANTED,
                    )
            pairs.add((action, model))
        return TokenScope(frozenset(pairs), detail)

    def _regression_only(self, model: str) -> bool:
        versions = [] if self._registry is None else [m for m in self._registry.models() if m.name == model]
        return bool(versions) and all(m.manifest.outputs.is_regression for m in versions)
