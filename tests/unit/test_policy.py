"""The policy from the caller's side: names a caller chooses cannot grow its cache, and a grant of one
action never raises what another action may do."""

from __future__ import annotations

import pytest

from bastion.config import Action, Grant, OutputDetail, Role
from bastion.errors import ConfigError
from bastion.policy import EffectiveGrant, Policy, TokenScope, check_grant_overlaps

ROLES = {
    "wide": Role(grants=[Grant(models=["*"], actions=[Action.INFER])]),
    "named": Role(grants=[Grant(models=["m"], actions=[Action.INFER], output=OutputDetail.PROBABILITIES)]),
}


def test_caller_chosen_model_names_do_not_grow_the_cache() -> None:
    policy = Policy(ROLES)
    for i in range(20_000):  # what 100 token requests of 200 scopes each used to leave behind
        assert policy.grant(("wide",), f"infer-target-{i}").allows(Action.INFER)
        assert not policy.grant(("named",), f"infer-target-{i}").allows(Action.INFER)
    assert policy.cache_size() <= 2
    # Names the policy uses still fold on their own.
    assert policy.grant(("named",), "m").for_action(Action.INFER).output is OutputDetail.PROBABILITIES
    assert policy.grant(("wide", "named"), "m").for_action(Action.INFER).output is OutputDetail.PROBABILITIES
    assert policy.grant(("wide", "named"), "other").for_action(Action.INFER).output is OutputDetail.LABEL


def test_the_cache_is_bounded_whatever_the_keys_roles() -> None:
    policy = Policy(ROLES)
    for i in range(20_000):  # role lists come from keys; many distinct ones still stay bounded
        roles = ("wide", f"gone-{i}")
        assert policy.grant(roles, "m").allows(Action.INFER)
    assert policy.cache_size() <= 4096
    assert policy.grant(("wide", "gone-1"), "m").allows(Action.INFER)  # an evicted entry folds again


# --- One grant per action: a grant of another action never raises what an action may do ---------------

M = "m"


def _g(actions: list[str], output: str = "label", models: list[str] | None = None, **params: object) -> Grant:
    return Grant.model_validate({"models": models or [M], "actions": actions, "output": output, **params})


def _infer(policy: Policy, roles: tuple[str, ...], model: str = M) -> EffectiveGrant:
    return policy.grant(roles, model).for_action(Action.INFER)


def test_a_metadata_grant_does_not_raise_infer_output() -> None:
    policy = Policy({"r": Role(grants=[_g(["metadata"], "probabilities"), _g(["infer"], "label")])})
    infer = _infer(policy, ("r",))
    assert infer.output is OutputDetail.LABEL
    assert policy.grant(("r",), M).allows(Action.METADATA)


def test_an_aggregate_grant_does_not_raise_infer_output_or_lend_its_parameters() -> None:
    agg = _g(["aggregate"], "probabilities", epsilon=1.0, privacy_budget=4.0)
    policy = Policy({"r": Role(grants=[agg, _g(["infer"], "top_k", top_k=2)])})
    infer = _infer(policy, ("r",))
    assert infer.output is OutputDetail.TOP_K and infer.output_params.top_k == 2


def test_an_infer_grant_does_not_replace_the_aggregate_budget() -> None:
    dp = _g(["infer"], "dp_scores", epsilon=5.0, privacy_budget=50.0)
    agg = _g(["aggregate"], epsilon=1.0, privacy_budget=4.0)
    policy = Policy({"r": Role(grants=[dp, agg])})
    aggregate = policy.grant(("r",), M).for_action(Action.AGGREGATE)
    assert (aggregate.output_params.epsilon, aggregate.output_params.privacy_budget) == (1.0, 4.0)
    infer = _infer(policy, ("r",))
    assert (infer.output_params.epsilon, infer.output_params.privacy_budget) == (5.0, 50.0)


def test_across_two_roles_of_one_key() -> None:
    policy = Policy(
        {"meta": Role(grants=[_g(["metadata"], "probabilities")]), "inf": Role(grants=[_g(["infer"])])}
    )
    assert _infer(policy, ("meta", "inf")).output is OutputDetail.LABEL
    assert _infer(policy, ("inf", "meta")).output is OutputDetail.LABEL
    assert _infer(policy, ("meta",)).output is None  # metadata only: no answer at all


def test_a_wildcard_grant_of_another_action_does_not_raise_a_named_one() -> None:
    policy = Policy(
        {"r": Role(grants=[_g(["metadata", "admin"], "probabilities", models=["*"]), _g(["infer"], "label")])}
    )
    assert _infer(policy, ("r",)).output is OutputDetail.LABEL


def test_a_named_grant_beats_a_wildcard_of_the_same_action() -> None:
    policy = Policy(
        {
            "wide": Role(grants=[_g(["infer"], "probabilities", models=["*"])]),
            "narrow": Role(grants=[_g(["infer"], "label")]),
        }
    )
    assert _infer(policy, ("wide", "narrow")).output is OutputDetail.LABEL
    assert _infer(policy, ("wide", "narrow"), "other").output is OutputDetail.PROBABILITIES


def test_sensitive_inputs_granted_for_metadata_do_not_reach_infer() -> None:
    policy = Policy({"r": Role(grants=[_g(["metadata"], sensitive_inputs=True), _g(["infer"])])})
    assert not _infer(policy, ("r",)).sensitive_inputs
    # Nor from another grant of infer with a less revealing output: one grant applies, whole.
    policy = Policy(
        {"r": Role(grants=[_g(["infer"], "label", sensitive_inputs=True), _g(["infer"], "top_k")])}
    )
    infer = _infer(policy, ("r",))
    assert infer.output is OutputDetail.TOP_K and not infer.sensitive_inputs


def test_a_token_narrows_each_action_on_its_own() -> None:
    policy = Policy({"r": Role(grants=[_g(["metadata"], "probabilities"), _g(["infer"], "rounded")])})
    scope = TokenScope(frozenset({(Action.INFER, M), (Action.METADATA, M)}), OutputDetail.LABEL)
    narrowed = policy.grant(("r",), M).narrowed(scope, M)
    assert narrowed.for_action(Action.INFER).output is OutputDetail.LABEL
    # top_k is below rounded, but the rounded grant sets no k: not served (the metadata grant's output
    # does not lend it one).
    scope = TokenScope(frozenset({(Action.INFER, M), (Action.METADATA, M)}), OutputDetail.TOP_K)
    narrowed = policy.grant(("r",), M).narrowed(scope, M)
    assert not narrowed.allows(Action.INFER) and narrowed.allows(Action.METADATA)
    only_meta = policy.grant(("r",), M).narrowed(TokenScope(frozenset({(Action.METADATA, M)})), M)
    assert only_meta.for_action(Action.INFER).output is None


# --- Overlaps no fold can honour are refused at start-up, naming both grants ---------------------------


@pytest.mark.parametrize(
    ("grants", "words"),
    [
        ([_g(["infer"], "top_k", top_k=2), _g(["infer"], "top_k", top_k=5)], ["top_k 2 vs 5"]),
        (  # two wildcards
            [_g(["infer"], "dp_scores", models=["*"], epsilon=2), _g(["infer"], "dp_scores", models=["*"])],
            ["epsilon 2.0 vs 1.0"],
        ),
        (  # aggregate: the output does not matter, the budget does
            [_g(["aggregate"], privacy_budget=4), _g(["infer", "aggregate"], "probabilities")],
            ["'aggregate'", "privacy_budget 4.0 vs 10.0"],
        ),
        ([_g(["infer"]), _g(["infer", "metadata"], sensitive_inputs=True)], ["sensitive_inputs"]),
    ],
)
def test_equal_grants_of_one_role_with_different_terms_are_refused(
    grants: list[Grant], words: list[str]
) -> None:
    with pytest.raises(ConfigError) as e:
        check_grant_overlaps({"a": Role(grants=grants)}, "bastion.toml")
    for word in ["bastion.toml:", "roles.a.grants.0", "roles.a.grants.1", *words]:
        assert word in str(e.value)
    with pytest.raises(ConfigError):
        Policy({"a": Role(grants=grants)})


def test_across_roles_the_most_restrictive_equal_grant_applies() -> None:
    policy = Policy(
        {
            "k2": Role(grants=[_g(["infer"], "top_k", top_k=2), _g(["aggregate"], privacy_budget=4)]),
            "k5": Role(grants=[_g(["infer"], "top_k", top_k=5, sensitive_inputs=True), _g(["aggregate"])]),
            "dp_hour": Role(
                grants=[
                    _g(["infer"], "dp_scores", models=["n"], privacy_budget=5, budget_window_seconds=3600)
                ]
            ),
            "dp_day": Role(grants=[_g(["infer"], "dp_scores", models=["n"], privacy_budget=10, epsilon=0.5)]),
        }
    )
    for roles in [("k2", "k5"), ("k5", "k2")]:
        infer = _infer(policy, roles)
        assert infer.output_params.top_k == 2 and not infer.sensitive_inputs
        assert policy.grant(roles, M).for_action(Action.AGGREGATE).output_params.privacy_budget == 4
    # 10 a day is a slower spending rate than 5 an hour: that grant applies, whole (its epsilon too).
    dp = _infer(policy, ("dp_hour", "dp_day"), "n").output_params
    assert (dp.privacy_budget, dp.budget_window_seconds, dp.epsilon) == (10, 86_400, 0.5)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (_g(["infer"], "dp_scores", global_privacy_budget=5), _g(["aggregate"], global_privacy_budget=6)),
        (
            _g(["infer"], "dp_scores", models=["*"], global_privacy_budget=5),
            _g(["infer", "metadata"], "dp_scores", global_privacy_budget=5, budget_window_seconds=60),
        ),
        (
            _g(["infer"], "private_prediction", global_privacy_budget=1),
            _g(["infer"], "private_prediction", models=["*"], sigma=2, global_privacy_budget=2),
        ),
    ],
)
def test_two_global_budgets_on_one_ledger_row_are_refused(a: Grant, b: Grant) -> None:
    with pytest.raises(ConfigError) as e:
        check_grant_overlaps({"x": Role(grants=[a]), "y": Role(grants=[b])}, "bastion.toml")
    assert "roles.x.grants.0.global_privacy_budget" in str(e.value)
    assert "roles.y.grants.0.global_privacy_budget" in str(e.value)


def test_overlaps_that_a_fold_honours_are_accepted() -> None:
    check_grant_overlaps(
        {
            # Different outputs (the more revealing applies, whole), a wildcard under a named grant,
            # different budgets on different models or units, one global limit repeated.
            "a": Role(grants=[_g(["infer"], "top_k", top_k=2), _g(["infer"], "probabilities", models=["*"])]),
            "b": Role(
                grants=[
                    _g(["infer"], "label"),
                    _g(["infer"], "dp_scores", models=["n"], global_privacy_budget=3),
                ]
            ),
            "c": Role(grants=[_g(["aggregate"], models=["n"], global_privacy_budget=3, privacy_budget=2)]),
            "d": Role(grants=[_g(["infer"], "private_prediction", models=["n"], global_privacy_budget=9)]),
        },
        "bastion.toml",
    )
