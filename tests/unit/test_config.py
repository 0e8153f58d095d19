from __future__ import annotations

from pathlib import Path

import pytest

from bastion.config import OutputDetail, load_config
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


def test_serve_with_invalid_config_exits_with_one_clear_line(tmp_path: Path) -> None:
    path = _write(tmp_path, '[audit]\ndurability = "maybe"\n')
    result = run_cli("serve", "--config", path, check=False)
    assert result.returncode == 2
    assert f"{path}: audit.durability:" in result.stderr
    assert "Traceback" not in result.stderr


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
