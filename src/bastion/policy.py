"""Deny-by-default authorization, precomputed.

A principal gets exactly what its roles grant, per model, action, output detail
and sensitive input; a token may only narrow that. Rules are folded once per
(roles, model) pair into an `EffectiveGrant`, so the request path does a dict
lookup, not a rule evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bastion.config import Action, Config, Grant, OutputDetail, Role

_DEFAULT_PARAMS = Grant(models=["*"], actions=[Action.INFER])
_UNNAMED = "\0unnamed"  # stands for every model no grant names: they all fold the same way
_CACHE_HALF = 2048  # folded grants kept: between this and twice this


@dataclass(frozen=True, slots=True)
class EffectiveGrant:
    actions: frozenset[Action] = frozenset()
    output: OutputDetail | None = None
    sensitive_inputs: bool = False
    # The grant whose output policy applies: it carries the policy's parameters (k, decimals, epsilon...).
    output_params: Grant = _DEFAULT_PARAMS

    def allows(self, action: Action) -> bool:
        return action in self.actions

    def narrowed(self, scope: TokenScope | None, model: str) -> EffectiveGrant:
        if scope is None:
            return self
        actions = self.actions & scope.actions_for(model)
        output = self.output
        if output is not None and scope.output is not None and scope.output.rank < output.rank:
            output = scope.output
        return EffectiveGrant(
            actions, output if actions else None, self.sensitive_inputs and bool(actions), self.output_params
        )


NO_GRANT = EffectiveGrant()


@dataclass(frozen=True, slots=True)
class TokenScope:
    """What a token narrows its key to: (action, model) pairs, and at most this output detail."""

    pairs: frozenset[tuple[Action, str]]
    output: OutputDetail | None = None
    _by_model: dict[str, frozenset[Action]] = field(default_factory=dict, compare=False, hash=False)

    def actions_for(self, model: str) -> frozenset[Action]:
        cached = self._by_model.get(model)
        if cached is None:
            cached = frozenset(a for a, m in self.pairs if m in (model, "*"))
            self._by_model[model] = cached
        return cached

    def encode(self) -> list[str]:
        return sorted(f"{a.value}:{m}" for a, m in self.pairs)


class Policy:
    def __init__(self, roles: dict[str, Role]) -> None:
        self._roles = roles
        # Model names reach grant() from callers (a token request's scope), so the cache is keyed by
        # the names the policy itself uses, and kept in two generations like privacy.AnswerCache.
        self._named = frozenset(m for role in roles.values() for g in role.grants for m in g.models)
        self._young: dict[tuple[tuple[str, ...], str], EffectiveGrant] = {}
        self._old: dict[tuple[tuple[str, ...], str], EffectiveGrant] = {}

    def cache_size(self) -> int:
        return len(self._young) + len(self._old)

    @classmethod
    def from_config(cls, config: Config) -> Policy:
        return cls(dict(config.roles))

    def role(self, name: str) -> Role | None:
        return self._roles.get(name)

    def grant(self, roles: tuple[str, ...], model: str) -> EffectiveGrant:
        key = (roles, model if model in self._named else _UNNAMED)
        grant = self._young.get(key)
        if grant is None:
            grant = self._old.get(key)
            if grant is None:
                grant = self._fold(roles, key[1])
            if len(self._young) >= _CACHE_HALF:
                self._old, self._young = self._young, {}
            self._young[key] = grant
        return grant

    def _fold(self, roles: tuple[str, ...], model: str) -> EffectiveGrant:
        actions: set[Action] = set()
        output: OutputDetail | None = None
        params = _DEFAULT_PARAMS
        sensitive = False
        for role_name in roles:
            role = self._roles.get(role_name)
            if role is None:  # a key naming a role the config no longer has gets nothing from it
                continue
            for g in role.grants:
                if model not in g.models and "*" not in g.models:
                    continue
                actions.update(g.actions)
                if output is None or g.output.rank > output.rank:
                    output, params = g.output, g
                sensitive = sensitive or g.sensitive_inputs
        return EffectiveGrant(frozenset(actions), output, sensitive, params) if actions else NO_GRANT

    def most_detailed_output(self, roles: tuple[str, ...], action: Action) -> OutputDetail | None:
        """The most revealing output detail that any of the roles' grants of `action` carries."""
        details = [
            g.output
            for name in roles
            if (role := self._roles.get(name))
            for g in role.grants
            if action in g.actions
        ]
        return max(details, key=lambda d: d.rank, default=None)

    def grants_anywhere(self, roles: tuple[str, ...], action: Action) -> bool:
        """Whether any of the roles grants `action` on any model."""
        return any(
            action in g.actions for name in roles if (role := self._roles.get(name)) for g in role.grants
        )

    def server_actions(self, roles: tuple[str, ...]) -> frozenset[Action]:
        """Actions granted on the server itself (grants naming model '*'), e.g. admin for /metrics."""
        return self.grant(roles, "*").actions
