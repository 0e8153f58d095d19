"""The policy's folded-grant cache from the caller's side: names a caller chooses cannot grow it."""

from __future__ import annotations

from bastion.config import Action, Grant, OutputDetail, Role
from bastion.policy import Policy

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
    assert policy.grant(("named",), "m").output is OutputDetail.PROBABILITIES
    assert policy.grant(("wide", "named"), "m").output is OutputDetail.PROBABILITIES
    assert policy.grant(("wide", "named"), "other").output is OutputDetail.LABEL


def test_the_cache_is_bounded_whatever_the_keys_roles() -> None:
    policy = Policy(ROLES)
    for i in range(20_000):  # role lists come from keys; many distinct ones still stay bounded
        roles = ("wide", f"gone-{i}")
        assert policy.grant(roles, "m").allows(Action.INFER)
    assert policy.cache_size() <= 4096
    assert policy.grant(("wide", "gone-1"), "m").allows(Action.INFER)  # an evicted entry folds again


def test_most_detailed_output_of_an_action() -> None:
    policy = Policy(ROLES)
    assert policy.most_detailed_output(("wide", "named"), Action.INFER) is OutputDetail.PROBABILITIES
    assert policy.most_detailed_output(("wide",), Action.INFER) is OutputDetail.LABEL
    assert policy.most_detailed_output(("wide",), Action.METADATA) is None
