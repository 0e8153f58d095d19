from __future__ import annotations

import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from bastion.config import Config, OutputDetail, load_config
from bastion.errors import ConfigError
from tests.helpers import run_cli


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bastion.toml"
    path.write_text(text)
    return path


def test_valid_config_resolves_paths_against_its_folder(tmp_path: Path) -> None:
    cfg = load_config(
        _write(
            tmp_path,
            '[server]\nstate_dir = "st"\n[[models]]\npath = "m"\n'
            '[roles.a]\ngrants = [{models = ["m"], actions = ["infer"]}]\n',
        )
    )
    assert cfg.server.state_dir == tmp_path.resolve() / "st"
    assert cfg.models[0].path == tmp_path.resolve() / "m"
    assert cfg.roles["a"].grants[0].output is OutputDetail.LABEL  # least detail by default
    assert cfg.audit.durability == "sync"


@pytest.mark.parametrize(
    ("text", "field", "reason"),
    [
        (
            '[roles.a]\ngrants = [{models = ["m"], actions = ["steal"]}]\n',
            "roles.a.grants.0.actions.0",
            "Input should be",
        ),
        (
            '[roles.a]\ngrants = [{models = ["m"], actions = ["infer"], output = "all"}]\n',
            "roles.a.grants.0.output",
            "",
        ),
        ("[limits]\nmax_body_bytes = 1\n", "limits.max_body_bytes", "greater than or equal"),
        ('[audit]\ndurability = "maybe"\n', "audit.durability", ""),
        ("[server]\nport = 70000\n", "server.port", "less than or equal"),
        ("[server]\nbogus = 1\n", "server.bogus", "Extra inputs are not permitted"),
        ("[roles.a]\nrate = -1\n", "roles.a.rate", "greater than"),
    ],
)
def test_invalid_config_names_file_field_and_reason(
    tmp_path: Path, text: str, field: str, reason: str
) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith(f"{path}: {field}:"), message
    assert reason in message


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path, "[server\n"))
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "absent.toml")


@pytest.mark.slow
def test_serve_with_invalid_config_exits_with_one_clear_line(tmp_path: Path) -> None:
    path = _write(tmp_path, '[audit]\ndurability = "maybe"\n')
    result = run_cli("serve", "--config", path, check=False)
    assert result.returncode == 2
    assert f"{path}: audit.durability:" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_grant_naming_an_unserved_model_stops_start_up(tmp_path: Path) -> None:
    from tests.helpers import write_test_deployment

    config, _ = write_test_deployment(tmp_path / "d")
    config.write_text(
        config.read_text().replace(
            'models = ["loan"], actions = ["metadata"]', 'models = ["laon"], actions = ["metadata"]'
        )
    )
    result = run_cli("serve", "--config", config, check=False)
    assert result.returncode == 2
    assert "roles.outsider.grants.0.models: model 'laon' is not served" in result.stderr


@pytest.mark.slow
def test_grant_naming_a_regressor_with_a_policy_for_classes_stops_start_up(tmp_path: Path) -> None:
    from tests.helpers import write_test_deployment

    config, _ = write_test_deployment(tmp_path / "d")
    text = config.read_text().replace(
        '{ models = ["breast-cancer"], actions = ["infer", "metadata"], output = "top_k", top_k = 2 }',
        '{ models = ["breast-cancer", "diabetes"], actions = ["infer", "metadata"], output = "top_k", top_k = 2 }',
    )
    assert text != config.read_text()
    config.write_text(text)
    message = "roles.topk.grants.0.output: 'top_k' is made for classes and 'diabetes' is a regressor"
    for command in ("serve", "check"):  # `bastion check` catches it before a deployment does
        result = run_cli(command, "--config", config, check=False)
        assert result.returncode == 2 and message in result.stderr
        assert "Traceback" not in result.stderr


# -- A setting that is accepted must be enforced ------------------------------------------------------

# Each case: a setting that the server would accept and then ignore, the field named in the refusal
# and what the message says uses it.
IGNORED = [
    ('output = "label", top_k = 2', "top_k", "output = 'top_k'"),
    ('output = "probabilities", decimals = 1', "decimals", "output = 'rounded'"),
    ('output = "rounded", beta = 0.6', "beta", "output = 'reverse_sigmoid'"),
    ('output = "rounded", gamma = 2.0', "gamma", "output = 'reverse_sigmoid'"),
    ('output = "private_prediction", mechanism = "gaussian"', "mechanism", "output = 'dp_scores'"),
    ('output = "top_k", epsilon = 0.5', "epsilon", "output = 'dp_scores' or the \"aggregate\" action"),
    ('output = "dp_scores", sigma = 2.0', "sigma", "output = 'private_prediction'"),
    ('output = "label", privacy_budget = 3.0', "privacy_budget", "output = 'dp_scores' or"),
    ('output = "label", global_privacy_budget = 5.0', "global_privacy_budget", "'private_prediction'"),
    ('output = "rounded", budget_window_seconds = 60', "budget_window_seconds", 'the "aggregate" action'),
    ('output = "label", delta = 1e-5', "delta", "output = 'dp_scores'"),
    ('output = "dp_scores", delta = 1e-5', "delta", "mechanism = 'gaussian'"),
]


@pytest.mark.parametrize(("grant", "field", "users"), IGNORED)
def test_a_grant_parameter_its_output_would_ignore_is_refused_naming_it(
    tmp_path: Path, grant: str, field: str, users: str
) -> None:
    path = _write(tmp_path, f'[roles.a]\ngrants = [{{ models = ["m"], actions = ["infer"], {grant} }}]\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith(f"{path}: roles.a.grants.0:") and f"{field} is used only by" in message
    assert users in message or field == "delta"
    assert "would ignore" in message or "would be ignored" in message


@pytest.mark.parametrize(
    "grant",
    [
        'output = "top_k", top_k = 2',
        'output = "rounded", decimals = 1',
        'output = "reverse_sigmoid", beta = 0.6, gamma = 2.0',
        'output = "dp_scores", mechanism = "gaussian", delta = 1e-5, epsilon = 0.5, privacy_budget = 3',
        'output = "dp_scores", global_privacy_budget = 5, budget_window_seconds = 60',
        'output = "private_prediction", sigma = 2.0, privacy_budget = 1, global_privacy_budget = 5',
        # Aggregates spend epsilon under a budget whatever the grant's output.
        "epsilon = 1.0, privacy_budget = 4.0, global_privacy_budget = 6, budget_window_seconds = 60",
    ],
)
def test_a_grant_parameter_its_output_uses_is_accepted(tmp_path: Path, grant: str) -> None:
    actions = '["infer", "aggregate"]' if "output" not in grant else '["infer"]'
    load_config(
        _write(tmp_path, f'[roles.a]\ngrants = [{{ models = ["m"], actions = {actions}, {grant} }}]\n')
    )


@pytest.mark.parametrize(
    ("text", "field", "reason"),
    [
        ('[state]\nredis_url = "redis://h:6379/0"\n', "state", "redis_url is used only by backend = 'redis'"),
        ('[state]\nbackend = "redis"\npostgres_table = "t"\n', "state", "postgres_table is used only by"),
        ('[audit]\npostgres_table = "t"\n', "audit", "postgres_table is used only by sink = 'postgres'"),
        ('[audit]\npostgres_dsn = "postgresql://h/db"\n', "audit", "with 'sqlite' it would be ignored"),
        ('[state]\nbackend = "memory"\nredis_prefix = "x:"\n', "state", "with 'memory' it would be ignored"),
        (
            '[[models]]\npath = "m"\nisolation_window_seconds = 60\n',
            "models.0",
            "isolation_window_seconds is used only when isolate_after > 0",
        ),
        (
            '[rollouts.m]\nstable = "1"\ncanary_weight = 0.5\n',
            "rollouts.m",
            "canary_weight applies to a canary",
        ),
        ('[rollouts.m]\nstable = "1"\nmin_requests = 5\n', "rollouts.m", "min_requests applies to a canary"),
        ("[grpc]\nport = 9001\n", "grpc", "port applies to the gRPC server, and enabled = false"),
        ('[grpc]\nenabled = false\nhost = "0.0.0.0"\n', "grpc", "host applies to the gRPC server"),
        (
            '[[llm.models]]\nname = "a"\nbackend = "local"\nupstream_model = "x"\n',
            "llm.models.0",
            'upstream_model is used only by backend = "upstream"',
        ),
        (
            '[[llm.models]]\nname = "a"\nbackend = "local"\nupstream_timeout_seconds = 5\n',
            "llm.models.0",
            'upstream_timeout_seconds is used only by backend = "upstream"',
        ),
        ('[[llm.models]]\nname = "a"\nbackend = "upstream"\n', "llm.models.0", "needs upstream_url"),
        (
            '[[llm.models]]\nname = "a"\nbackend = "local"\non_leak = "regenerate"\n',
            "llm.models.0",
            "on_leak applies to a protected prompt",
        ),
        ('[llm.prompts.p]\nfile = "p.txt"\n', "llm", "prompts.p: no model uses it"),
        (
            "[tracing]\nsample_ratio = 0.5\n",
            "tracing",
            "sample_ratio applies to tracing, and enabled = false",
        ),
        (
            '[tracing]\notlp_endpoint = "http://127.0.0.1:4318/v1/traces"\n',
            "tracing",
            "otlp_endpoint applies",
        ),
        (
            '[roles.r]\ngrants = [{ models = ["m"], actions = ["infer"] }]\n[roles.r.chat]\nmax_tokens = 9\n',
            "roles.r",
            'no grant has the "chat" action',
        ),
    ],
)
def test_a_setting_another_choice_would_ignore_is_refused(
    tmp_path: Path, text: str, field: str, reason: str
) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: {field}:") and reason in str(err.value)


def test_the_settings_that_apply_are_accepted(tmp_path: Path) -> None:
    load_config(
        _write(
            tmp_path,
            '[state]\nbackend = "redis"\nredis_url = "redis://h:6379/0"\nredis_prefix = "x:"\n'
            '[[models]]\npath = "m"\nisolate_after = 2\nisolation_window_seconds = 60\n'
            '[rollouts.m]\nstable = "1"\ncanary = "2"\ncanary_weight = 0.5\nmin_requests = 5\n',
        )
    )


_E2E = "tests/e2e/"
_REFUSED = "tests/unit/test_config.py::test_a_setting_another_choice_would_ignore_is_refused"
_GRANT_REFUSED = (
    "tests/unit/test_config.py::test_a_grant_parameter_its_output_would_ignore_is_refused_naming_it"
)
# Every field of the policy file: the test that shows it
# enforced. A parameter that only some choices use is also refused where it would be ignored.
ENFORCED: dict[tuple[str, str], str] = {
    ("Grant", "models"): _E2E + "test_http.py::test_role_without_the_model_gets_403",
    ("Grant", "actions"): _E2E + "test_http.py::test_role_without_the_model_gets_403",
    ("Grant", "output"): _E2E + "test_http.py::test_output_detail_is_enforced_server_side",
    ("Grant", "sensitive_inputs"): _E2E + "test_http.py::test_sensitive_input_needs_its_grant",
    ("Grant", "top_k"): _E2E + "test_output_policy.py::test_top_k_gives_classes_without_scores",
    ("Grant", "decimals"): _E2E + "test_output_policy.py::test_rounded_scores",
    ("Grant", "beta"): "tests/unit/test_privacy.py::test_reverse_sigmoid_keeps_the_argmax_and_sums_to_one",
    ("Grant", "gamma"): "tests/unit/test_privacy.py::test_reverse_sigmoid_keeps_the_argmax_and_sums_to_one",
    ("Grant", "mechanism"): "tests/unit/test_privacy.py::test_dp_calibration_and_injected_noise",
    ("Grant", "epsilon"): _E2E + "test_output_policy.py::test_dp_budget_runs_out_and_is_audited",
    ("Grant", "delta"): "tests/unit/test_privacy.py::test_gaussian_cost_matches_opendp",
    ("Grant", "privacy_budget"): _E2E + "test_budgets.py::test_two_grants_with_two_windows_keep_two_accounts",
    ("Grant", "sigma"): "tests/unit/stages/test_private_prediction.py::test_votes_and_budgets",
    ("Grant", "global_privacy_budget"): _E2E
    + "test_budgets.py::test_a_global_budget_on_dp_scores_binds_every_key_together",
    ("Grant", "budget_window_seconds"): _E2E
    + "test_budgets.py::test_two_grants_with_two_windows_keep_two_accounts",
    ("Role", "rate"): _E2E + "test_http.py::test_burst_over_the_limit_gets_429_with_retry_after",
    ("Role", "burst"): _E2E + "test_http.py::test_burst_over_the_limit_gets_429_with_retry_after",
    ("Role", "daily_quota"): _E2E + "test_http.py::test_daily_quota_gets_429",
    ("RequestLimits", "max_body_bytes"): _E2E
    + "test_http.py::test_oversized_body_is_refused_without_content_length",
    ("RequestLimits", "max_rows"): _E2E + "test_http.py::test_input_guard_rejects_each_bad_request_with_json",
    **{
        ("RequestLimits", field): "tests/unit/stages/test_address_limits.py::" + test
        for field, test in {
            "failed_auth_rate": "test_burst_then_rate",
            "failed_auth_burst": "test_burst_then_rate",
            "failed_auth_ipv6_prefix": "test_address_key_aggregates_ipv6_networks",
            "failed_auth_max_addresses": "test_full_table_fails_towards_throttling",
            "refusals_audited_per_window": "test_first_refusals_recorded_the_rest_counted_and_summarised_"
            "when_the_window_ends",
            "refusals_audited_total_per_window": "test_total_per_window_bounds_individual_records_across_addresses",
            "refusal_window_seconds": "test_window_timer_writes_the_summary_without_further_traffic",
        }.items()
    },
    ("StateSettings", "backend"): _E2E
    + "test_replicas.py::test_privacy_budget_is_spent_once_across_replicas",
    ("StateSettings", "redis_url"): _E2E
    + "test_replicas.py::test_a_server_without_its_state_server_refuses_with_503",
    ("StateSettings", "redis_prefix"): "tests/unit/test_service.py::"
    "test_shutdown_waits_for_the_block_being_leased_and_returns_everything_unspent",
    ("StateSettings", "postgres_dsn"): _E2E
    + "test_replicas.py::test_a_server_without_its_state_server_refuses_with_503",
    ("StateSettings", "postgres_table"): _E2E
    + "test_replicas.py::test_privacy_budget_is_spent_once_across_replicas",
    (
        "AuditSettings",
        "durability",
    ): "tests/unit/audit/test_audit_log.py::test_best_effort_does_not_wait_but_still_records",
    ("AuditSettings", "checkpoint_every_records"): "tests/unit/audit/test_audit_log.py::"
    "test_intact_log_verifies_with_group_commit_and_checkpoints",
    ("AuditSettings", "checkpoint_every_seconds"): "tests/unit/audit/test_audit_log.py::"
    "test_intact_log_verifies_with_group_commit_and_checkpoints",
    ("AuditSettings", "fsync"): _E2E + "test_crash.py::test_sigkill_under_load_loses_no_acknowledged_record",
    # The audit chain in PostgreSQL, shared by replicas (bastion.audit.postgres).
    ("AuditSettings", "sink"): _E2E + "test_audit_postgres.py::test_two_servers_write_one_postgres_chain",
    ("AuditSettings", "postgres_table"): _E2E
    + "test_audit_postgres.py::test_two_servers_write_one_postgres_chain",
    ("AuditSettings", "signing_key"): _E2E
    + "test_audit_postgres.py::test_two_servers_write_one_postgres_chain",
    ("AuditSettings", "postgres_dsn"): _E2E
    + "test_audit_postgres.py::test_postgres_outage_fails_closed_and_service_resumes",
    (
        "TokenSettings",
        "issuer",
    ): "tests/unit/test_tokens.py::test_other_server_key_issuer_or_audience_is_refused",
    (
        "TokenSettings",
        "audience",
    ): "tests/unit/test_tokens.py::test_other_server_key_issuer_or_audience_is_refused",
    ("TokenSettings", "ttl_seconds"): "tests/unit/test_tokens.py::test_round_trip_and_ttl_cap",
    ("MetricsSettings", "enabled"): _E2E + "test_budgets.py::test_disabled_metrics_are_not_served_to_anyone",
    ("ModelRef", "path"): _E2E + "test_supply_chain.py::test_tampered_bundle_is_refused_and_the_others_serve",
    ("ModelRef", "trusted_keys"): "tests/unit/bundle/test_verify.py::test_signature_from_an_untrusted_key",
    ("ModelRef", "allow_env_drift"): "tests/unit/bundle/test_verify.py::test_environment_lock_that_disagrees",
    (
        "ModelRef",
        "decryption_key",
    ): "tests/unit/bundle/test_verify.py::test_encrypted_bundle_needs_the_right_key",
    ("ModelRef", "unsafe_trust_pickle"): "tests/unit/bundle/test_verify.py::"
    "test_pickle_refused_by_default_and_loaded_only_when_trusted",
    (
        "ModelRef",
        "unsafe_unsigned",
    ): "tests/unit/bundle/test_verify.py::test_plain_directory_needs_unsafe_unsigned",
    ("ModelRef", "aggregates"): _E2E + "test_output_policy.py::test_aggregates_are_noisy_budgeted_and_cached",
    (
        "ModelRef",
        "out_of_distribution",
    ): "tests/unit/test_ood.py::test_the_screen_is_on_by_default_and_can_be_turned_off",
    ("ModelRef", "extraction_watch"): _E2E
    + "test_extraction.py::test_a_thief_is_quarantined_and_genuine_clients_are_not",
    ("ModelRef", "isolate_after"): _E2E
    + "test_extraction.py::test_a_model_flagged_by_several_principals_is_isolated_until_released",
    ("ModelRef", "isolation_window_seconds"): _E2E
    + "test_extraction.py::test_a_model_flagged_by_several_principals_is_isolated_until_released",
    ("RolloutSettings", "stable"): "tests/unit/test_rollout.py::test_weighted_routing",
    ("RolloutSettings", "canary"): "tests/unit/test_rollout.py::test_weighted_routing",
    ("RolloutSettings", "canary_weight"): "tests/unit/test_rollout.py::test_weighted_routing",
    (
        "RolloutSettings",
        "max_error_rate",
    ): "tests/unit/test_rollout.py::test_error_rate_rolls_back_after_min_requests",
    ("RolloutSettings", "max_p99_latency_ms"): "tests/unit/test_rollout.py::test_latency_rolls_back",
    ("RolloutSettings", "window_seconds"): "tests/unit/test_rollout.py::test_old_events_leave_the_window",
    (
        "RolloutSettings",
        "min_requests",
    ): "tests/unit/test_rollout.py::test_error_rate_rolls_back_after_min_requests",
    (
        "RolloutSettings",
        "max_requests_per_principal",
    ): "tests/unit/test_rollout.py::test_max_requests_per_principal_sets_the_cap",
}
# Fields used only under some other choice: each is refused where it would be ignored, by this test.
REFUSED_WHEN_IGNORED: dict[tuple[str, str], str] = {
    **{("Grant", f): _GRANT_REFUSED for _, f, _ in IGNORED},
    ("StateSettings", "redis_url"): _REFUSED,
    ("StateSettings", "redis_prefix"): _REFUSED,
    ("StateSettings", "postgres_dsn"): _REFUSED,
    ("StateSettings", "postgres_table"): _REFUSED,
    ("AuditSettings", "postgres_dsn"): _REFUSED,
    ("AuditSettings", "postgres_table"): _REFUSED,
    ("ModelRef", "isolation_window_seconds"): _REFUSED,
    **{
        ("RolloutSettings", f): _REFUSED
        for f in ("canary_weight", "max_error_rate", "max_p99_latency_ms", "window_seconds", "min_requests")
    },
}
_FRONT = _E2E + "test_frontend_limits.py::"
ENFORCED.update(
    {
        ("ServerSettings", "host"): _E2E
        + "test_serve_settings.py::test_serve_listens_on_the_policy_files_host_and_port",
        ("ServerSettings", "port"): _E2E
        + "test_serve_settings.py::test_serve_listens_on_the_policy_files_host_and_port",
        ("ServerSettings", "state_dir"): _E2E
        + "test_state_lock.py::test_second_server_on_the_same_state_dir_refuses_and_the_first_is_unaffected",
        ("ServerSettings", "max_header_bytes"): _FRONT + "test_head_over_its_byte_limit_gets_431_and_close",
        ("ServerSettings", "max_header_fields"): _FRONT + "test_too_many_header_fields_get_431",
        ("ServerSettings", "head_timeout_seconds"): _FRONT
        + "test_slowloris_head_gets_408_within_the_head_timeout",
        ("ServerSettings", "body_timeout_seconds"): _FRONT
        + "test_a_body_that_does_not_arrive_gets_408_and_close",
        ("ServerSettings", "keep_alive_seconds"): _FRONT + "test_an_idle_keep_alive_connection_is_closed",
        ("ServerSettings", "send_timeout_seconds"): _FRONT
        + "test_a_client_that_never_reads_its_answers_holds_no_slot_past_the_send_timeout",
        ("ServerSettings", "max_concurrent_requests"): _FRONT
        + "test_shedding_counts_requests_and_spares_health",
        ("ServerSettings", "max_connections"): _FRONT
        + "test_over_max_connections_the_oldest_idle_ones_are_closed",
        ("ServerSettings", "worker_heartbeat_timeout_seconds"): _E2E
        + "test_worker_heartbeat.py::test_a_stopped_worker_is_killed_and_replaced",
    }
)
_GRPC = _E2E + "test_grpc.py::"
ENFORCED.update(
    {
        ("GrpcSettings", "enabled"): _GRPC + "test_grpc_is_off_unless_enabled",
        ("GrpcSettings", "host"): _GRPC + "test_grpc_settings_are_enforced",
        ("GrpcSettings", "port"): _GRPC + "test_grpc_settings_are_enforced",
        ("GrpcSettings", "max_receive_message_bytes"): _GRPC + "test_grpc_settings_are_enforced",
        ("GrpcSettings", "max_send_message_bytes"): _GRPC + "test_grpc_settings_are_enforced",
        ("GrpcSettings", "max_concurrent_rpcs"): _GRPC + "test_grpc_concurrency_limit",
        ("GrpcSettings", "idle_timeout_seconds"): _GRPC + "test_an_idle_connection_is_closed",
        ("GrpcSettings", "message_timeout_seconds"): _GRPC + "test_a_call_that_never_sends_its_message_is_cut_off",
        ("GrpcSettings", "max_waiting_rpcs_per_address"): _GRPC + "test_one_address_cannot_hold_every_rpc_slot",
        ("GrpcSettings", "max_connections"): _GRPC + "test_connections_past_max_connections_are_closed_at_once",
    }
)
# Every [grpc] setting but `enabled` is refused while the server is off (one rule, two cases).
REFUSED_WHEN_IGNORED.update(
    {
        ("GrpcSettings", f): _REFUSED
        for f in (
            "host",
            "port",
            "max_receive_message_bytes",
            "max_send_message_bytes",
            "max_concurrent_rpcs",
            "idle_timeout_seconds",
            "message_timeout_seconds",
            "max_waiting_rpcs_per_address",
            "max_connections",
        )
    }
)
_LADDER = _E2E + "test_containment.py::test_a_thief_climbs_the_ladder_and_an_operator_lifts_it"
_LADDER_REFUSED = "tests/unit/test_containment.py::test_a_ladder_setting_that_would_be_ignored_is_refused"
ENFORCED.update(
    {
        ("ModelRef", "containment"): _LADDER,
        ("ModelRef", "throttle_rate"): _LADDER,
        ("ModelRef", "degrade_to"): _LADDER,
        ("ModelRef", "containment_seconds"): "tests/unit/test_containment.py::"
        "test_timed_measures_end_by_themselves_and_on_release",
    }
)
REFUSED_WHEN_IGNORED.update(
    {
        ("ModelRef", f): _LADDER_REFUSED
        for f in ("containment", "throttle_rate", "degrade_to", "containment_seconds")
    }
)
_CHAT = "tests/unit/llm/test_chat_core.py::"
_CHAT_UPSTREAM = _E2E + "test_chat_upstream.py::"
ENFORCED.update(
    {
        ("ChatLimits", "max_tokens"): _CHAT + "test_refusals_before_the_model",
        ("ChatLimits", "max_messages"): _CHAT + "test_refusals_before_the_model",
        ("ChatLimits", "max_request_bytes"): _CHAT + "test_the_roles_request_byte_cap",
        ("ChatLimits", "max_prompt_tokens"): _CHAT + "test_the_roles_prompt_token_cap",
        ("ChatLimits", "max_in_flight"): _CHAT + "test_one_key_cannot_fill_the_queue",
        ("ChatLimits", "token_budget"): _CHAT
        + "test_the_token_budget_refuses_with_429_and_refunds_what_was_not_used",
        ("ChatLimits", "token_budget_window_seconds"): _CHAT
        + "test_the_token_budget_window_sets_retry_after",
        ("ProtectedPromptSettings", "file"): _CHAT
        + "test_a_granted_chat_answers_behind_the_protected_prompt",
        ("ProtectedPromptSettings", "secrets"): _CHAT
        + "test_the_guard_withholds_an_answer_that_leaks_the_secret",
        ("ChatModelSettings", "name"): _CHAT + "test_no_key_a_wrong_model_and_an_ungranted_one",
        ("ChatModelSettings", "backend"): _E2E
        + "test_openai_client.py::test_a_chat_completion",  # local; upstream: test_chat_upstream.py
        ("ChatModelSettings", "prompt"): _CHAT + "test_a_granted_chat_answers_behind_the_protected_prompt",
        ("ChatModelSettings", "client_system"): _CHAT
        + "test_a_client_system_message_is_demoted_where_policy_says",
        ("ChatModelSettings", "on_leak"): _CHAT + "test_regenerate_once_then_refuse",
        ("ChatModelSettings", "extraction_watch"): _CHAT
        + "test_prompt_extraction_auditing_contains_an_attacker",
        ("ChatModelSettings", "redact"): _CHAT_UPSTREAM + "test_redaction_off_passes_the_text_unchanged",
        ("ChatModelSettings", "max_tokens"): _CHAT + "test_the_models_own_max_tokens_and_context",
        ("ChatModelSettings", "unsafe_no_leakage_guard"): _CHAT
        + "test_unsafe_no_leakage_guard_lets_the_leak_through_and_says_so",
        ("ChatModelSettings", "context_tokens"): _CHAT + "test_the_models_own_max_tokens_and_context",
        ("ChatModelSettings", "temperature"): _CHAT + "test_the_models_own_max_tokens_and_context",
        ("ChatModelSettings", "max_concurrent"): _CHAT + "test_a_busy_model_answers_503_model_busy",
        ("ChatModelSettings", "max_waiting"): _CHAT + "test_a_busy_model_answers_503_model_busy",
        ("ChatModelSettings", "upstream_url"): _CHAT_UPSTREAM
        + "test_the_openai_client_through_bastion_to_a_real_upstream",
        ("ChatModelSettings", "upstream_model"): _CHAT_UPSTREAM
        + "test_bastion_sends_the_upstream_model_the_credential_and_the_prompt_first",
        ("ChatModelSettings", "upstream_credential"): _CHAT_UPSTREAM
        + "test_a_refused_credential_is_502_and_never_echoed",
        ("ChatModelSettings", "upstream_timeout_seconds"): _CHAT_UPSTREAM
        + "test_an_upstream_that_hangs_is_cut_off_at_its_timeout",
    }
)
REFUSED_WHEN_IGNORED.update(
    {
        **{
            ("ChatModelSettings", f): _REFUSED
            for f in ("upstream_model", "upstream_timeout_seconds", "upstream_url", "on_leak")
        },
        ("ProtectedPromptSettings", "file"): _REFUSED,
    }
)
_TRACING = "tests/unit/test_tracing.py::"
ENFORCED.update(
    {
        ("TracingSettings", "enabled"): _TRACING
        + "test_tracing_off_makes_no_span_object_and_leaves_the_stages_unwrapped",
        ("TracingSettings", "otlp_endpoint"): _TRACING + "test_spans_reach_the_otlp_endpoint_over_http",
        ("TracingSettings", "sample_ratio"): _TRACING
        + "test_sample_ratio_zero_traces_no_request_of_its_own_and_one_traces_each",
        ("LoggingSettings", "format"): _E2E
        + "test_logs.py::test_attack_traffic_leaves_only_redacted_json_lines",
    }
)
# Both [tracing] settings but `enabled` are refused while tracing is off.
REFUSED_WHEN_IGNORED.update({("TracingSettings", f): _REFUSED for f in ("otlp_endpoint", "sample_ratio")})
_DRIFT = "tests/unit/test_drift.py::"
ENFORCED.update(
    {
        ("DriftSettings", f): _DRIFT + "test_each_feature_threshold_and_the_window_are_enforced"
        for f in ("enabled", "window_rows", "psi_threshold", "ks_threshold")
    }
    | {
        ("DriftSettings", "interval_seconds"): _DRIFT + "test_the_interval_spaces_evaluations",
        ("DriftSettings", "prediction_psi_threshold"): _DRIFT
        + "test_a_shift_in_the_predicted_classes_alerts",
        ("DriftSettings", "ood_rate_threshold"): _DRIFT
        + "test_out_of_distribution_refusals_alert_past_their_rate",
        ("DriftSettings", "latency_factor"): _DRIFT
        + "test_latency_alerts_past_its_factor_over_the_baseline_and_clears",
        ("DriftSettings", "error_rate_increase"): _DRIFT
        + "test_errors_alert_past_their_increase_over_the_baseline",
    }
)
# A drift setting while enabled = false (shown on window_rows), and ood_rate_threshold without the screen.
REFUSED_WHEN_IGNORED.update(
    {
        ("DriftSettings", f): _DRIFT + "test_drift_settings_that_would_be_ignored_are_refused"
        for f in ("window_rows", "ood_rate_threshold")
    }
)
# Timeouts and circuit breakers (bastion.breaker): over HTTP with a real hanging ONNX model, and the
# two a single server cannot show from outside (threads, window) in-process from the policy file.
_BREAKER_E2E = _E2E + "test_breaker.py::test_a_hung_model_is_cut_off_its_breaker_opens_and_a_probe_closes_it"
ENFORCED.update(
    {("ModelRef", f): _BREAKER_E2E for f in ("inference_timeout_seconds", "breaker_failures")}
    | {("ModelRef", f): _BREAKER_E2E for f in ("breaker_open_seconds", "breaker_half_open_probes")}
    | {
        ("ModelRef", f): "tests/unit/test_breaker.py::test_the_policy_files_threads_and_window_are_the_guards"
        for f in ("inference_threads", "breaker_window_seconds")
    }
    | {
        ("ModelRef", "inference_isolation"): "tests/unit/test_breaker.py::"
        "test_inline_isolation_holds_the_event_loop_until_the_deadline_and_thread_isolation_does_not"
    }
)
REFUSED_WHEN_IGNORED[("ModelRef", "inference_threads")] = (
    "tests/unit/test_breaker.py::"
    "test_inline_isolation_is_refused_where_it_could_not_stop_a_call_or_would_ignore_threads"
)
# The bounded wait for a model's thread (finding 6 of bench/redteam_scale: waiting counted as timeouts).
ENFORCED.update(
    {
        ("ModelRef", f): "tests/unit/test_breaker.py::"
        "test_the_policy_files_queue_bounds_hold_and_refuse_as_load_never_as_failure"
        for f in ("inference_queue", "inference_queue_per_principal", "inference_queue_seconds")
    }
)
REFUSED_WHEN_IGNORED.update(
    {
        ("ModelRef", f): "tests/unit/test_breaker.py::test_queue_settings_that_would_be_ignored_are_refused"
        for f in ("inference_queue", "inference_queue_per_principal", "inference_queue_seconds")
    }
)
# TLS and client certificates (bastion.tls, bastion.certs): attacked over a real server, REST and gRPC.
_TLS = _E2E + "test_tls.py::"
_TLS_REFUSED = "tests/unit/test_tls.py::test_tls_settings_that_could_not_work_are_refused_naming_the_field"
ENFORCED.update(
    {
        ("TlsSettings", "cert_file"): "tests/unit/test_tls.py::"
        "test_certificate_files_that_cannot_serve_are_refused_naming_the_field",
        ("TlsSettings", "key_file"): "tests/unit/test_tls.py::"
        "test_certificate_files_that_cannot_serve_are_refused_naming_the_field",
        ("TlsSettings", "client_ca_file"): _TLS + "test_certificates_from_another_ca_or_expired_fail_the_handshake",
        ("TlsSettings", "client_auth"): _TLS + "test_require_refuses_a_connection_without_a_valid_certificate",
        ("TlsSettings", "min_version"): "tests/unit/test_tls.py::test_min_version_1_3_refuses_a_tls12_client",
        ("TlsSettings", "reload_interval_seconds"): _TLS + "test_grpc_follows_a_certificate_reload_and_so_does_rest",
        ("ClientCertificateSettings", "revoked_public_keys"): _TLS
        + "test_unmapped_revoked_and_doubly_credentialed_certificates_get_nothing",
        ("CertificateIdentity", "name"): _TLS
        + "test_the_audit_names_the_certificate_principal_and_public_key_never_the_certificate",
        **{
            ("CertificateIdentity", f): _TLS + "test_client_certificates_map_to_their_principals_and_roles"
            for f in ("subject", "spiffe_id", "roles")
        },
    }
)
# A client CA without client_auth, or revocations while no certificate is asked for (identities too: a
# section, whose fields are each enforced above).
REFUSED_WHEN_IGNORED.update(
    {
        ("TlsSettings", "client_ca_file"): _TLS_REFUSED,
        ("ClientCertificateSettings", "revoked_public_keys"): _TLS_REFUSED,
    }
)
_OWNED_ELSEWHERE: set[str] = set()


def _sections(model: type[BaseModel], seen: dict[str, type[BaseModel]]) -> None:
    """Every settings model reachable from `model`, through fields, lists and dicts."""
    seen[model.__name__] = model
    for info in model.model_fields.values():
        for inner in _models_in(info.annotation):
            if inner.__name__ not in seen:
                _sections(inner, seen)


def _models_in(annotation: object) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def test_every_config_field_is_enforced_by_a_named_test_or_refused() -> None:
    """A field added to the policy file without enforcement (or without a test that shows it) fails here:
    name the test that shows it enforced in ENFORCED, or refuse it at start-up."""
    seen: dict[str, type[BaseModel]] = {}
    _sections(Config, seen)
    fields = {
        (name, field)
        for name, model in seen.items()
        if name not in _OWNED_ELSEWHERE | {"Config"}
        for field, info in model.model_fields.items()
        if not _models_in(info.annotation)  # a section: its own fields are walked instead
    }
    assert {"Grant", "Role", "ModelRef", "RolloutSettings", "MetricsSettings"} <= set(seen)
    assert fields - ENFORCED.keys() == set(), "fields no test shows enforced"
    assert ENFORCED.keys() - fields == set(), "table rows for fields that no longer exist"
    assert REFUSED_WHEN_IGNORED.keys() <= fields
    root = Path(__file__).resolve().parents[2]
    for where in {*ENFORCED.values(), *REFUSED_WHEN_IGNORED.values()}:
        path, name = where.split("::")
        assert f"def {name}(" in (root / path).read_text(), f"{where}: no such test"
    # Each refused field has a case in the refusal tests.
    refused_cases = {f for _, f, _ in IGNORED} | {
        "redis_url",
        "postgres_table",
        "redis_prefix",
        "isolation_window_seconds",
        "canary_weight",
        "port",
        "host",
        "upstream_model",
        "upstream_timeout_seconds",
        "on_leak",
        "file",  # a prompt no model uses
        "window_rows",  # [models.drift] while enabled = false (tests/unit/test_drift.py)
        "ood_rate_threshold",  # [models.drift] with out_of_distribution = "off"
        "sample_ratio",  # [tracing] while enabled = false
        "otlp_endpoint",
        # [server.tls] and [client_certificates] while no client certificate is asked for (tests/unit/test_tls.py)
        "client_ca_file",
        "revoked_public_keys",
    }
    assert {f for _, f in REFUSED_WHEN_IGNORED} - refused_cases <= {
        "postgres_dsn",  # the same rule as postgres_table (one prefix test for the pair)
        "max_error_rate",  # the same rule as canary_weight and min_requests
        "max_p99_latency_ms",
        "window_seconds",
        "min_requests",
        "upstream_url",  # the same rule as upstream_model (every upstream_* field)
        # The ladder's settings: their cases are in tests/unit/test_containment.py.
        "containment",
        "throttle_rate",
        "degrade_to",
        "containment_seconds",
        "inference_threads",  # with inference_isolation = "inline": its case is in tests/unit/test_breaker.py
        "inference_queue",  # the same, and per_principal above the queue (tests/unit/test_breaker.py)
        "inference_queue_per_principal",
        "inference_queue_seconds",
        # the [grpc] rule (a setting while enabled = false), shown on port and host
        "max_receive_message_bytes",
        "max_send_message_bytes",
        "max_concurrent_rpcs",
        "idle_timeout_seconds",
        "message_timeout_seconds",
        "max_waiting_rpcs_per_address",
        "max_connections",
    }
