"""The command line from an operator's side: no secret echoed, a closed pipe survived, state kept."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest

from bastion.cli import main
from bastion.keys import KeyStore
from tests.helpers import BASTION

CONFIG = """
[server]
state_dir = "state"

[roles.analyst]
grants = [ { models = ["*"], actions = ["infer"] } ]
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "bastion.toml"
    path.write_text(CONFIG)
    return path


@pytest.fixture
def cli(capfd: pytest.CaptureFixture[str]):  # type: ignore[no-untyped-def]
    """The real command line, in this process (a subprocess pays seconds of imports per call)."""

    def run(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
        capfd.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse's own refusal (usage, exit 2), as the real process ends
            code = e.code if isinstance(e.code, int) else 2
        out, err = capfd.readouterr()
        if check and code != 0:
            raise AssertionError(f"bastion {args} failed: {err}")
        return subprocess.CompletedProcess(list(args), code, out, err)

    return run


def _create(config: Path, name: str = "k") -> str:
    store = KeyStore(config.parent / "state" / "keys.db")
    key = store.create(name=name, roles=["analyst"], now=1.0e9).secret
    store.close()
    return key


def _secret_part(key: str) -> str:
    return key.split("_", 2)[2]


@pytest.mark.parametrize("command", ["revoke", "release"])
def test_a_full_key_given_for_a_key_id_is_never_echoed(cli: Any, config: Path, command: str) -> None:
    key = _create(config)
    key_id, secret = key.split("_")[1], _secret_part(key)
    other = _create(config, "other")  # a key from another store: unknown here, its secret no less secret
    other_store_key = other.replace(other.split("_")[1], "0123456789abcdef", 1)
    inputs = [
        key,  # the real key, as pasted from a leak
        other_store_key,  # shaped like a key, id unknown
        key[:-5],  # truncated while pasting
        key.replace("bst_", "BST_"),  # not a key shape at all
        secret,  # the secret part alone
        # A secret part that starts with "-" reads as an option to argparse, which quotes what it
        # cannot parse: as help with flags (-h), as the config option's value (-c), as an unknown
        # short or long option.
        *(prefix + secret[len(prefix) :] for prefix in ("-", "-h", "-c", "-k", "--", "--config=")),
        key + "\n",  # with the newline of a copied line
    ]
    for value in inputs:
        result = cli("keys", command, "--config", config, value, check=False)
        out = result.stdout + result.stderr
        for part in (secret, _secret_part(other_store_key), secret[:20], value.strip()[-20:]):
            assert part not in out, f"{command} {value[:8]}...: the secret appears in the output"
        assert "Traceback" not in out
    # The real key was recognised and acted on by its id alone.
    store = KeyStore(config.parent / "state" / "keys.db")
    record = store.get(key_id)
    store.close()
    assert record is not None
    if command == "revoke":
        assert record.revoked_at is not None
    first = cli("keys", command, "--config", config, key, check=False)
    assert key_id in first.stderr + first.stdout


def test_a_bare_key_id_still_works_and_a_bad_one_is_not_repeated(cli: Any, config: Path) -> None:
    key = _create(config)
    key_id = key.split("_")[1]
    assert f"revoked {key_id}" in cli("keys", "revoke", "--config", config, key_id).stdout
    refused = cli("keys", "revoke", "--config", config, "hunter2-not-an-id", check=False)
    assert refused.returncode == 2 and "expected a key id" in refused.stderr
    assert "hunter2" not in refused.stderr + refused.stdout


def _pipe_into_early_closing_reader(*args: str | Path) -> subprocess.CompletedProcess[bytes]:
    """Run `bastion ARGS | head -c 1`: the reader takes one byte and closes the pipe."""
    writer = subprocess.Popen([*BASTION, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert writer.stdout is not None
    writer.stdout.read(1)
    writer.stdout.close()  # the reader goes away while the writer still has lines to write
    stderr = writer.stderr.read() if writer.stderr else b""
    writer.wait(timeout=60)
    return subprocess.CompletedProcess(writer.args, writer.returncode, b"", stderr)


@pytest.mark.slow
def test_listing_into_a_closed_pipe_ends_quietly(config: Path) -> None:
    import sqlite3

    KeyStore(config.parent / "state" / "keys.db").close()
    # More lines than a pipe holds (64 KiB), so the writer is still writing when the reader leaves.
    rows = [(f"{i:016x}", b"\0" * 32, f"key-{i}", '["analyst"]', 1.0e9 + i, None) for i in range(2000)]
    with sqlite3.connect(config.parent / "state" / "keys.db") as db:
        db.executemany("INSERT INTO api_keys VALUES (?, ?, ?, ?, ?, ?, NULL, NULL)", rows)
    result = _pipe_into_early_closing_reader("keys", "list", "--config", config)
    # The reader took what it wanted: not a failure (exit 0, as `set -o pipefail` scripts need), silent.
    assert (result.returncode, result.stderr) == (0, b"")
    # The same through a shell pipeline, as a script runs it.
    bastion = " ".join(shlex.quote(str(a)) for a in BASTION)
    for reader in ("head -1", "head -c 1", "true"):  # `true` reads nothing: the pipe is closed at once
        line = (
            f"set -o pipefail; {bastion} keys list --config {shlex.quote(str(config))} | {reader} >/dev/null"
        )
        piped = subprocess.run(["bash", "-c", line], capture_output=True, timeout=60)
        assert (piped.returncode, piped.stderr) == (0, b""), (reader, piped.stderr)


def test_key_list_columns_are_aligned_and_separated(cli: Any, config: Path) -> None:
    key = _create(config, "a-rather-long-key-name-for-the-column")
    _create(config, "short")
    store = KeyStore(config.parent / "state" / "keys.db")
    store.quarantine(key.split("_")[1], now=2.0e9)  # "quarantined": longer than the old column
    store.close()
    lines = cli("keys", "list", "--config", config).stdout.splitlines()
    header = lines[0]
    starts = [header.index(h) for h in ("KEY ID", "NAME", "ROLES", "STATUS", "CREATED", "EXPIRES")]
    for line in lines[1:]:
        for start in starts[1:]:
            assert line[start - 2 : start] == "  ", f"columns run together: {line!r}"
            assert line[start] != " ", f"a column does not start under its header: {line!r}"
    assert any("quarantined  " in line for line in lines[1:])


@pytest.mark.slow
def test_a_second_demo_keeps_keys_and_audit_log(cli: Any, tmp_path: Path) -> None:
    root = tmp_path / "demo"
    first = cli("demo", "--dir", root, "--no-serve")
    assert "export ANALYST=bst_" in first.stderr
    state = root / "state"
    keys_before = KeyStore(state / "keys.db").list()
    audit = state / "audit.db"
    audit.parent.mkdir(exist_ok=True)
    if not audit.exists():  # written by a server; stand in for one so its survival can be checked
        audit.write_bytes(b"records")
    audit_before = audit.read_bytes()

    second = cli("demo", "--dir", root, "--no-serve")
    assert "bst_" not in second.stdout + second.stderr, "a second run printed a key"
    assert "kept" in second.stderr and "bastion keys create" in second.stderr and "--reset" in second.stderr
    assert [k.key_id for k in KeyStore(state / "keys.db").list()] == [k.key_id for k in keys_before]
    assert audit.read_bytes() == audit_before
    assert (root / "bundles" / "breast-cancer-1").is_dir()  # the models were rebuilt beside the state

    third = cli("demo", "--dir", root, "--no-serve", "--reset")
    assert "export ANALYST=bst_" in third.stderr
    fresh = {k.key_id for k in KeyStore(state / "keys.db").list()}
    assert fresh.isdisjoint(k.key_id for k in keys_before) and len(fresh) == 2
    assert not audit.exists() or audit.read_bytes() != audit_before


def test_demo_never_deletes_a_directory_that_is_not_a_demo(cli: Any, tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    for extra in ((), ("--reset",)):
        result = cli("demo", "--dir", precious, "--no-serve", *extra, check=False)
        assert result.returncode == 2 and "not a Bastion demo" in result.stderr
        assert (precious / "thesis.tex").read_text() == "years of work"


def _plant(root: Path) -> dict[Path, str]:
    """Files an operator keeps beside (and inside the folders of) a demo."""
    planted = {
        root / "precious.txt": "mine",
        root / "mydata" / "rows.csv": "1,2,3",
        root / "models" / "mine" / "model.onnx": "my model",
        root / "bundles" / "breast-cancer-2" / "x": "a later bundle",
        root / "keys" / "other.pem": "my key",
    }
    for path, text in planted.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return planted


@pytest.mark.slow
def test_a_demo_rebuild_deletes_only_what_the_demo_wrote(cli: Any, tmp_path: Path) -> None:
    root = tmp_path / "demo"
    cli("demo", "--dir", root, "--no-serve")
    planted = _plant(root)
    for extra in ((), ("--reset",)):
        result = cli("demo", "--dir", root, "--no-serve", *extra)
        assert {p: p.read_text() for p in planted if p.exists()} == planted, extra
        for name in ("precious.txt", "mydata/", "models/mine/", "bundles/breast-cancer-2/", "keys/other.pem"):
            assert name in result.stderr, (name, result.stderr)  # named in the warning
        assert (root / "bundles" / "breast-cancer-1").is_dir() and (root / "keys" / "release.pub").is_file()


@pytest.mark.slow
def test_a_copied_demo_marker_licenses_no_deletion(cli: Any, tmp_path: Path) -> None:
    """The marker is a file anyone can copy: a directory holding one loses only the demo's own names."""
    from bastion.demo import MARKER

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / MARKER).write_text("copied")
    planted = _plant(victim)
    result = cli("demo", "--dir", victim, "--no-serve", "--reset")
    assert {p: p.read_text() for p in planted if p.exists()} == planted
    assert "precious.txt" in result.stderr


def test_a_key_encryption_key_given_for_its_location_is_never_echoed(cli: Any, tmp_path: Path) -> None:
    from bastion.bundle.crypto import new_kek

    kek = new_kek()  # pasted where `env:NAME` or `file:PATH` belongs
    for args in (
        ("verify", tmp_path, "--trusted-key", tmp_path / "k.pub", "--decryption-key", kek),
        ("pack", tmp_path, "--output", tmp_path / "out", "--encrypt", kek),
        (
            "registry",
            "push",
            tmp_path,
            "--registry",
            tmp_path,
            "--trusted-key",
            tmp_path,
            "--decryption-key",
            kek,
        ),
    ):
        result = cli(*args, check=False)
        out = result.stdout + result.stderr
        assert result.returncode == 2 and "env:NAME" in out, out
        assert kek not in out and kek[:16] not in out


@pytest.mark.slow
def test_demo_reset_refuses_while_a_server_holds_its_state(cli: Any, tmp_path: Path) -> None:
    from bastion.statedir import lock_state_dir

    root = tmp_path / "demo"
    cli("demo", "--dir", root, "--no-serve")
    keys_before = [k.key_id for k in KeyStore(root / "state" / "keys.db").list()]
    lock = lock_state_dir(root / "state")  # what `bastion serve` holds while it runs
    try:
        result = cli("demo", "--dir", root, "--no-serve", "--reset", check=False)
    finally:
        lock.release()
    assert result.returncode == 2, result.stderr
    assert f"PID {os.getpid()}" in result.stderr and "state" in result.stderr
    assert [k.key_id for k in KeyStore(root / "state" / "keys.db").list()] == keys_before
    # Once the server is gone, --reset wipes as before.
    assert cli("demo", "--dir", root, "--no-serve", "--reset").returncode == 0


@pytest.mark.parametrize(
    "url",
    [
        "http://user:hunter2secret@127.0.0.1:1/",
        "http://hunter2secret@127.0.0.1:1",
        "http://127.0.0.1:1/?token=hunter2secret",
        "http://127.0.0.1:1/#hunter2secret",
        "http://u:hunter2secret@127.0.0.1:notaport/",  # http.client.InvalidURL repeats the netloc
        "ftp://u:hunter2secret@127.0.0.1/",  # the wrong scheme, refused before any request
    ],
)
def test_redteam_never_prints_credentials_in_its_url(url: str) -> None:
    from bastion.redteam import RemoteError, RemoteModel, redact_url

    with pytest.raises(RemoteError) as e:
        RemoteModel(url, "m", "k", timeout=2)
    assert "hunter2secret" not in str(e.value)
    assert "127.0.0.1" in str(e.value)
    assert "hunter2secret" not in redact_url(url)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("FULL", id="a-full-key"),
        pytest.param("ci FULL", id="a-key-inside"),
        pytest.param("TRUNCATED", id="a-truncated-key"),
    ],
)
def test_a_key_name_holding_a_key_is_refused_and_not_echoed(cli: Any, config: Path, name: str) -> None:
    """Red team #9 F5: `keys create --name <a key>` stored it, and `keys list` printed the secret."""
    key = _create(config)
    name = name.replace("FULL", key).replace("TRUNCATED", key[:30])
    result = cli("keys", "create", "--config", config, "--name", name, "--role", "analyst", check=False)
    assert result.returncode != 0
    assert _secret_part(key)[:8] not in result.stdout + result.stderr
    listed = cli("keys", "list", "--config", config).stdout
    assert _secret_part(key)[:8] not in listed and len(listed.splitlines()) == 2


@pytest.mark.parametrize("name", ["x" * 65, "", "a\nb", "a\x1b[2Jb"])
def test_a_key_name_is_a_short_printable_label(cli: Any, config: Path, name: str) -> None:
    result = cli("keys", "create", "--config", config, "--name", name, "--role", "analyst", check=False)
    assert result.returncode != 0 and "printable" in result.stderr
    assert cli("keys", "create", "--config", config, "--name", "x" * 64, "--role", "analyst").returncode == 0


@pytest.mark.parametrize(
    ("settings", "flags"),
    [
        pytest.param("", ["--host", "0.0.0.0"], id="host-flag"),  # noqa: S104 (what is refused)
        pytest.param('host = "0.0.0.0"\n', [], id="server-host"),
        pytest.param('host = "10.1.2.3"\n', ["--workers", "2"], id="workers"),
    ],
)
def test_unsafe_no_defenses_is_refused_on_a_reachable_host(
    tmp_path: Path, settings: str, flags: list[str]
) -> None:
    """Red team #9: `serve --unsafe-no-defenses` (no key, output policy or audit: every model in full to
    anyone) started on any host; a production config's 0.0.0.0 exposed everything unaudited."""
    config = tmp_path / "bastion.toml"
    config.write_text(CONFIG.replace("[server]\n", f"[server]\n{settings}", 1))
    try:
        result = subprocess.run(
            [*BASTION, "serve", "--config", str(config), "--port", "0", "--unsafe-no-defenses", *flags],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except subprocess.TimeoutExpired:
        raise AssertionError("the server started") from None
    assert result.returncode != 0
    assert "--unsafe-no-defenses serves every model to anyone" in result.stderr


@pytest.mark.parametrize("seconds", ["0", "-5", "99999999999999999999"])
def test_an_expiry_that_would_never_expire_or_be_born_expired_is_refused(
    cli: Any, config: Path, seconds: str
) -> None:
    """Red team #9 F16: `--expires-in 0` made a key that never expires (0 is falsy), -5 one born expired,
    10^20 one that never expires either."""
    result = cli(
        "keys",
        "create",
        "--config",
        config,
        "--name",
        "k",
        "--role",
        "analyst",
        "--expires-in",
        seconds,
        check=False,
    )
    assert result.returncode != 0 and "expires-in" in result.stderr
    assert "bst_" not in result.stdout
    created = cli(
        "keys", "create", "--config", config, "--name", "k", "--role", "analyst", "--expires-in", "60"
    )
    assert created.stdout.startswith("bst_")
    listed = cli("keys", "list", "--config", config).stdout.splitlines()
    assert len(listed) == 2 and listed[1].split()[-1] != "-"  # an expiry is shown


def test_pack_with_an_empty_encrypt_is_refused_not_left_unencrypted(cli: Any, tmp_path: Path) -> None:
    """Red team #9 F17: `bastion pack M OUT --encrypt "$KEK"` with KEK unset (an empty string) packed
    the bundle unencrypted, silently: an empty value was taken for no option."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    from bastion.demo import feature_spec, write_skops_model
    from bastion.manifest import OutputSpec

    x = np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32)
    y = (x[:, 0] > 0).astype(int)
    model = tmp_path / "m"
    write_skops_model(
        model, LogisticRegression().fit(x, y), [feature_spec(x)], OutputSpec(classes=["a", "b"]), "m"
    )
    out = tmp_path / "bundle"
    result = cli("pack", model, "--output", out, "--encrypt", "", check=False)
    assert result.returncode != 0 and "--encrypt" in result.stderr
    assert not out.exists()
    assert cli("pack", model, "--output", out).returncode == 0  # the same model packs without the option
