"""Deny-by-default authorization, precomputed.

A principal gets exactly what its roles grant, per model, action, output detail
and sensitive input; a token may only narrow that. Rules are folded once per
(roles, model) pair into an `EffectiveGrant`, so the request path does a dict
lookup, not a rule evaluation. The fold is per action: only grants that include
the action being performed say what it may return, spend or accept.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import combinations
from typing import NamedTuple

from bastion.config import _PARAMETER_USERS, Action, Config, Grant, OutputDetail, Role
from bastion.errors import ConfigError

_DEFAULT_PARAMS = Grant(models=["*"], actions=[Action.INFER])
_UNNAMED = "\0unnamed"  # stands for every model no grant names: they all fold the same way
_CACHE_HALF = 2048  # folded grants kept: between this and twice this


class Applied(NamedTuple):
    """What one action on one model may do: the single grant that applies to it, whole."""

    output: OutputDetail
    sensitive_inputs: bool
    params: Grant  # the grant itself: its output policy's parameters (k, decimals, epsilon, budget...)


@dataclass(frozen=True, slots=True)
class EffectiveGrant:
    """A principal's grant on one model. `by_action` holds, per granted action, the one grant that
    applies to it; `for_action(a)` is the view a request performing `a` reads (`output`,
    `sensitive_inputs`, `output_params`), so no action borrows another action's output or parameters."""

    actions: frozenset[Action] = frozenset()
    output: OutputDetail | None = None
    sensitive_inputs: bool = False
    output_params: Grant = _DEFAULT_PARAMS
    by_action: Mapping[Action, Applied] = field(default_factory=dict, hash=False)

    def allows(self, action: Action) -> bool:
        return action in self.actions

    def for_action(self, action: Action) -> EffectiveGrant:
        """The view for a request performing `action`: that action's output, sensitive-input right and
        parameters (no output and no sensitive inputs when the action is not granted)."""
        applied = self.by_action.get(action) if action in self.actions else None
        if applied is None:
            return EffectiveGrant(self.actions, None, False, _DEFAULT_PARAMS, self.by_action)
        return EffectiveGrant(
            self.actions, applied.output, applied.sensitive_inputs, applied.params, self.by_action
        )

    def narrowed(self, scope: TokenScope | None, model: str) -> EffectiveGrant:
        """The grant a token with `scope` gets: its actions on this model only, infer capped at the
        token's output claim. Returns the per-model grant (call `for_action` for a view).

        The claim is served only as `serves_claim` allows, with the infer grant's own parameters. A claim
        above the grant's output leaves the grant's own (narrower) output; a claim below it that the grant
        cannot serve (top_k under probabilities, private_prediction under label: their parameters were
        never set) drops infer on this model: refused, never served with defaults no grant set."""
        if scope is None:
            return self
        actions = self.actions & scope.actions_for(model)
        cap = scope.output
        infer = self.by_action.get(Action.INFER)
        if cap is not None and infer is not None and Action.INFER in actions:
            if serves_claim(infer.output, cap):
                infer = infer._replace(output=cap)
            elif cap.rank < infer.output.rank:
                actions -= {Action.INFER}
        by_action = {
            a: infer if a is Action.INFER and infer is not None else applied
            for a, applied in self.by_action.items()
            if a in actions
        }
        return EffectiveGrant(actions, by_action=by_action) if actions else NO_GRANT


def serves_claim(granted: OutputDetail, claim: OutputDetail) -> bool:
    """Whether a grant of output `granted` can serve a token claiming output `claim` with the grant's own
    parameters: its own output, or `label` under a class policy ranked above label (label takes no
    parameters). Anything else would need parameters (k, decimals, sigma, budget...) the grant never set."""
    return claim is granted or (claim is OutputDetail.LABEL and granted.rank > OutputDetail.LABEL.rank)


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
        """Raises ConfigError when two grants overlap in a way no fold can honour (check_grant_overlaps);
        start-up and `bastion check` run that check first with the file's path."""
        check_grant_overlaps(roles, "policy")
        self._roles = roles
        # Model names reach grant() from callers (a token request's scope), so the cache is keyed by
        # the names the policy itself uses, and kept in two generations like privacy.AnswerCache.
        self._named = frozenset(m for role in roles.values() for g in role.grants for m in g.models)
        self._young: dict[tuple[tuple[str, ...], str], EffectiveGrant] = {}
        self._old: dict[tuple[tuple[str, ...], str], EffectiveGrant] = {}
        # Per (served model, unit): asked only with the name of a model the registry serves.
        self._global: dict[tuple[str, str], tuple[float, float] | None] = {}

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
        # Per action, the grants that include it; a grant naming the model outranks a "*" grant (the
        # specific rule is the operator's word on this model), whichever roles they come from.
        named: dict[Action, list[Grant]] = {}
        wild: dict[Action, list[Grant]] = {}
        for role_name in roles:
            role = self._roles.get(role_name)
            if role is None:  # a key naming a role the config no longer has gets nothing from it
                continue
            for g in role.grants:
                bucket = named if model in g.models else wild if "*" in g.models else None
                if bucket is None:
                    continue
                for action in g.actions:
                    bucket.setdefault(action, []).append(g)
        by_action: dict[Action, Applied] = {}
        for action in named.keys() | wild.keys():
            g = _choose(action, named.get(action) or wild[action])
            by_action[action] = Applied(g.output, g.sensitive_inputs, g)
        return EffectiveGrant(frozenset(by_action), by_action=by_action) if by_action else NO_GRANT

    def global_budget(self, model: str, unit: str) -> tuple[float, float] | None:
        """The model's global privacy budget for `unit` ('epsilon' or 'rho') as (limit, window seconds):
        the `global_privacy_budget` of the grants, in any role, that cover the model and spend the unit
        (`check_grant_overlaps` made them agree), or None. Every principal's answers on the model spend
        it, also under a grant that sets none: a global budget that one role's answers bypass is not one."""
        key = (model, unit)
        if key not in self._global:
            self._global[key] = next(
                (
                    (g.global_privacy_budget, g.budget_window_seconds)
                    for role in self._roles.values()
                    for g in role.grants
                    if g.global_privacy_budget is not None
                    and (model in g.models or "*" in g.models)
                    and unit in _charged_units(g)
                ),
                None,
            )
        return self._global[key]

    def outputs_of(self, roles: tuple[str, ...], action: Action) -> frozenset[OutputDetail]:
        """The output details of all the roles' grants of `action`, on any model."""
        return frozenset(
            g.output
            for name in roles
            if (role := self._roles.get(name))
            for g in role.grants
            if action in g.actions
        )

    def grants_anywhere(self, roles: tuple[str, ...], action: Action) -> bool:
        """Whether any of the roles grants `action` on any model."""
        return any(
            action in g.actions for name in roles if (role := self._roles.get(name)) for g in role.grants
        )

    def server_actions(self, roles: tuple[str, ...]) -> frozenset[Action]:
        """Actions granted on the server itself (grants naming model '*'), e.g. admin for /metrics."""
        return self.grant(roles, "*").actions


def _choose(action: Action, candidates: list[Grant]) -> Grant:
    """The one grant that applies to `action`, whole (output, sensitive-input right and parameters
    together, never mixed from several grants, so a key never gets more than one grant it holds gives).

    For infer, the most revealing output: the key holds that grant anyway. Among grants with the same
    output (only possible across roles: one role's are refused at start-up), and for aggregate, where
    the output does not matter, the most restrictive (`_restrictiveness`): holding one more role never
    loosens the noise, budget or inputs another role already set for this output."""
    if action is Action.INFER:
        top = max(g.output.rank for g in candidates)
        candidates = [g for g in candidates if g.output.rank == top]
    return min(candidates, key=_restrictiveness)


def _restrictiveness(g: Grant) -> tuple[object, ...]:
    """Smaller is more restrictive. Only the parameters a grant's output or aggregates use can differ
    (the config refuses setting the others), so one order serves every output: no sensitive inputs; a
    global budget; the lowest long-run spending rate (budget per second of window), then budget; the
    smallest epsilon; the largest sigma; the fewest classes; the fewest decimals; the strongest
    perturbation. The mechanism and delta only break the last ties, so that the choice is stable."""
    return (
        g.sensitive_inputs,
        g.global_privacy_budget is None,
        g.privacy_budget / g.budget_window_seconds,
        g.privacy_budget,
        g.epsilon,
        -g.sigma,
        g.top_k,
        g.decimals,
        -g.beta,
        -g.gamma,
        g.mechanism,
        g.delta,
    )


# What each action reads of the grant that applies to it. Infer: the output and its parameters, and the
# sensitive-input right. Aggregate: the DP parameters and the sensitive-input right (no output detail).
# Metadata and admin: nothing but being granted (metadata describes the infer grant).
def _terms(action: Action, g: Grant) -> dict[str, object]:
    if action is Action.INFER:
        names = [n for n, (outputs, _) in _PARAMETER_USERS.items() if g.output in outputs]
        return {"output": g.output.value, "sensitive_inputs": g.sensitive_inputs} | {
            n: getattr(g, n) for n in names if n != "delta" or g.mechanism == "gaussian"
        }
    if action is Action.AGGREGATE:
        names = [n for n, (_, aggregates) in _PARAMETER_USERS.items() if aggregates]
        return {"sensitive_inputs": g.sensitive_inputs} | {n: getattr(g, n) for n in names}
    return {}


def _charged_units(g: Grant) -> set[str]:
    """The privacy units a grant spends ('epsilon': dp_scores and aggregates; 'rho': private prediction)."""
    units = set()
    if Action.AGGREGATE in g.actions or (Action.INFER in g.actions and g.output is OutputDetail.DP_SCORES):
        units.add("epsilon")
    if Action.INFER in g.actions and g.output is OutputDetail.PRIVATE_PREDICTION:
        units.add("rho")
    return units


def check_grant_overlaps(roles: Mapping[str, Role], path: object) -> None:
    """Refuse grants that overlap in a way no fold can honour, naming both (`roles.X.grants.i`).

    Raises ConfigError for:
    - two grants of one role for the same action on the same model, both naming it (or both "*"),
      that would apply with different terms (infer: the same output with different parameters or
      sensitive-input right; aggregate: different epsilon, budgets, window or sensitive-input right).
      Every key of the role holds both, and which was meant cannot be told. (Across roles, a key that
      holds both gets the most restrictive: see `_choose`.)
    - two grants on a common model (a "*" covers every model), in any roles, that spend the same unit
      and set different `global_privacy_budget` or windows: all principals share the model's global
      ledger row, so it can have only one limit.
    """
    entries = [
        (r, f"roles.{r}.grants.{i}", g) for r, role in roles.items() for i, g in enumerate(role.grants)
    ]
    for (role_a, field_a, a), (role_b, field_b, b) in combinations(entries, 2):
        names_a, names_b = set(a.models) - {"*"}, set(b.models) - {"*"}
        same_level = sorted(names_a & names_b) or (["*"] if "*" in a.models and "*" in b.models else [])
        for action in sorted(set(a.actions) & set(b.actions)) if same_level and role_a == role_b else []:
            terms_a, terms_b = _terms(action, a), _terms(action, b)
            if action is Action.INFER and a.output is not b.output:
                continue  # the more revealing output applies, whole
            differ = sorted(k for k in terms_a if terms_a[k] != terms_b[k])
            if differ:
                detail = ", ".join(f"{k} {terms_a[k]!r} vs {terms_b[k]!r}" for k in differ)
                raise ConfigError(
                    f"{path}: {field_a} and {field_b} both grant {action.value!r} on model "
                    f"{same_level[0]!r} with different terms ({detail}): every key of the role holds "
                    "both and which one was meant cannot be told; make them agree, or name the model in one"
                )
        # The models both cover: a "*" covers the other's named models, and two "*" every model.
        common = (
            (names_a & names_b)
            | (names_b if "*" in a.models else set())
            | (names_a if "*" in b.models else set())
        )
        if "*" in a.models and "*" in b.models:
            common.add("*")
        shared = _charged_units(a) & _charged_units(b)
        if not common or not shared or a.global_privacy_budget is None or b.global_privacy_budget is None:
            continue
        if (a.global_privacy_budget, a.budget_window_seconds) != (
            b.global_privacy_budget,
            b.budget_window_seconds,
        ):
            raise ConfigError(
                f"{path}: {field_a}.global_privacy_budget ({a.global_privacy_budget}, window "
                f"{a.budget_window_seconds} s) and {field_b}.global_privacy_budget ({b.global_privacy_budget}, "
                f"window {b.budget_window_seconds} s) differ for model {sorted(common)[0]!r} "
                f"({sorted(shared)[0]}): all principals share one global budget per model, so it has one limit"
            )
