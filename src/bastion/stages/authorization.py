"""Authorization, deny by default: the model exists (404 only after authentication) and is granted."""

from __future__ import annotations

from collections.abc import Callable

from bastion.config import Action
from bastion.context import RequestContext
from bastion.errors import PermissionDenied
from bastion.policy import Policy
from bastion.registry import ModelRegistry


class AuthorizeModel:
    def __init__(
        self,
        policy: Policy,
        registry: ModelRegistry,
        action: Action,
        pick_version: Callable[[str], str | None] = lambda _: None,
    ) -> None:
        self._policy = policy
        self._registry = registry
        self._action = action
        self._pick_version = pick_version  # the rollout's choice for unversioned requests

    async def __call__(self, ctx: RequestContext) -> None:
        principal = ctx.principal
        assert principal is not None and ctx.model_name is not None
        version = ctx.model_version
        if version is None and self._registry.exists(ctx.model_name):
            version = self._pick_version(ctx.model_name)
            ctx.routed = version is not None
        ctx.model = self._registry.get(ctx.model_name, version)
        # The view for this action only: its output, parameters and sensitive-input right come from
        # the grant of this action, never from a grant of another action on the same model.
        grant = (
            self._policy.grant(principal.roles, ctx.model_name)
            .narrowed(principal.scope, ctx.model_name)
            .for_action(self._action)
        )
        if not grant.allows(self._action):
            raise PermissionDenied(f"not permitted to {self._action.value} model {ctx.model_name!r}")
        ctx.grant = grant
        ctx.output_detail = grant.output


class AuthorizeServer:
    """Server-wide actions (metrics): granted by a grant on model '*'."""

    def __init__(self, policy: Policy, action: Action) -> None:
        self._policy = policy
        self._action = action

    async def __call__(self, ctx: RequestContext) -> None:
        principal = ctx.principal
        assert principal is not None
        actions = self._policy.server_actions(principal.roles)
        if principal.scope is not None:
            actions = actions & principal.scope.actions_for("*")
        if self._action not in actions:
            raise PermissionDenied(f"not permitted: {self._action.value}")
