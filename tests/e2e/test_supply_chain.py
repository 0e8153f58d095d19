"""The real server against a tampered model store: the bad bundle is refused, the others serve,
the refusal is audited, and an encrypted model's plaintext never touches the disk."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest

from tests.helpers import create_key, run_cli, start_server, write_test_deployment


@pytest.fixture(scope="module")
def tampered(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("tampered")
    config, build = write_test_deployment(root)
    model = root / "bundles" / "breast-cancer-1" / "model.onnx"
    model.chmod(0o644)
    data = bytearray(model.read_bytes())
    data[-10] ^= 0xFF  # one flipped byte in the weights
    model.write_bytes(bytes(data))
    key = create_key(config, "admin")
    tmpdir = root / "tmp"
    tmpdir.mkdir()
    previous = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(tmpdir)  # everything the server process writes goes here or to state/
    try:
        server = start_server(config, root / "server.log")
    finally:
        if previous is None:
            del os.environ["TMPDIR"]
        else:
            os.environ["TMPDIR"] = previous
    yield root, config, build, server, key
    server.stop()


def test_tampered_bundle_is_refused_and_the_others_serve(tampered) -> None:  # type: ignore[no-untyped-def]
    root, _config, build, server, key = tampered
    with server.client(key) as c:
        assert c.get("/v2/health/ready").status_code == 503  # not every configured model serves
        assert c.get("/v2/models/breast-cancer").status_code == 404
        body = {
            "inputs": [
                {
                    "name": "features",
                    "shape": [1, 30],
                    "datatype": "FP32",
                    "data": [float(v) for v in build.features[0]],
                }
            ]
        }
        r = c.post("/v2/models/breast-cancer-skops/infer", json=body)  # the encrypted one
        assert r.status_code == 200, r.text
    log = (root / "server.log").read_text()
    assert "model.onnx: digest mismatch" in log


def test_refusal_is_in_the_audit_log(tampered) -> None:  # type: ignore[no-untyped-def]
    root, config, *_ = tampered
    conn = sqlite3.connect(root / "state" / "audit.db")
    loads = [json.loads(b) for (b,) in conn.execute("SELECT body FROM records") if '"model_load"' in b]
    conn.close()
    denied = [r for r in loads if r["decision"] == "deny"]
    assert len(denied) == 1 and denied[0]["reason"] == "digest_mismatch"
    assert "model.onnx: digest mismatch" in denied[0]["detail"]
    assert {r["model"] for r in loads if r["decision"] == "allow"} == {
        "breast-cancer-skops",
        "diabetes",
        "loan",
    }
    assert run_cli("audit", "verify", "--config", config).returncode == 0


def test_no_plaintext_of_the_encrypted_model_on_disk(tampered) -> None:  # type: ignore[no-untyped-def]
    root, *_ = tampered
    plaintext = (root / "models" / "breast-cancer-skops" / "model.skops").read_bytes()
    probes = [plaintext[i : i + 48] for i in range(0, len(plaintext) - 48, max(1, len(plaintext) // 16))]
    dirs = (root / "tmp", root / "state", root / "bundles" / "breast-cancer-skops-1")
    written = [p for d in dirs for p in d.rglob("*") if p.is_file()]
    assert written
    for path in written:
        data = path.read_bytes()
        assert not any(probe in data for probe in probes), f"plaintext model bytes found in {path}"


def test_cli_verify_names_the_difference(tampered) -> None:  # type: ignore[no-untyped-def]
    root, *_ = tampered
    pub = root / "keys" / "release.pub"
    bad = run_cli("verify", root / "bundles" / "breast-cancer-1", "--trusted-key", pub, check=False)
    assert bad.returncode == 1 and "REFUSED (digest_mismatch)" in bad.stderr and "model.onnx" in bad.stderr
    good = run_cli("verify", root / "bundles" / "loan-1", "--trusted-key", pub)
    assert good.stdout.startswith("OK: loan 1 sha256:")
    enc = run_cli("verify", root / "bundles" / "breast-cancer-skops-1", "--trusted-key", pub, check=False)
    assert enc.returncode == 1 and "decryption_failed" in enc.stderr
    ok = run_cli(
        "verify",
        root / "bundles" / "breast-cancer-skops-1",
        "--trusted-key",
        pub,
        "--decryption-key",
        f"file:{root / 'keys' / 'kek.key'}",
    )
    assert ok.returncode == 0


def test_cli_keygen_pack_sign_round_trip(tmp_path: Path, tampered) -> None:  # type: ignore[no-untyped-def]
    root, *_ = tampered
    env_pass = {"BASTION_SIGNING_PASSPHRASE": "a long test passphrase"}
    os.environ.update(env_pass)
    try:
        assert run_cli("keygen", "-o", tmp_path / "k.key").returncode == 0
        assert b"ENCRYPTED" in (tmp_path / "k.key").read_bytes()  # encrypted at rest
        assert oct((tmp_path / "k.key").stat().st_mode & 0o777) == "0o600"
        again = run_cli("keygen", "-o", tmp_path / "k.key", check=False)
        assert again.returncode == 2 and "refusing to overwrite" in again.stderr
        assert run_cli("kek", "-o", tmp_path / "kek.key").returncode == 0
        prov = tmp_path / "prov.json"
        prov.write_text(json.dumps({"training_data_sha256": "ab" * 32, "metrics": {"accuracy": 0.97}}))
        out = run_cli(
            "pack",
            root / "models" / "loan",
            "-o",
            tmp_path / "b",
            "--encrypt",
            f"file:{tmp_path / 'kek.key'}",
            "--provenance",
            prov,
        )
        assert "sha256:" in out.stdout
        bundle = json.loads((tmp_path / "b" / "bundle.json").read_text())
        assert bundle["provenance"]["metrics"] == {"accuracy": 0.97} and bundle["provenance"]["created_by"]
        assert bundle["environment"]["packages"]["scikit-learn"]
        assert run_cli("sign", tmp_path / "b", "--key", tmp_path / "k.key").returncode == 0
        ok = run_cli(
            "verify",
            tmp_path / "b",
            "--trusted-key",
            tmp_path / "k.pub",
            "--decryption-key",
            f"file:{tmp_path / 'kek.key'}",
        )
        assert ok.returncode == 0
        os.environ["BASTION_SIGNING_PASSPHRASE"] = "the wrong passphrase"
        (tmp_path / "b" / "model.sig").unlink()
        wrong = run_cli("sign", tmp_path / "b", "--key", tmp_path / "k.key", check=False)
        assert wrong.returncode == 2 and "cannot sign with this key" in wrong.stderr
        bad_prov = tmp_path / "bad.json"
        bad_prov.write_text(json.dumps({"seeds": {"a": "not a number"}}))
        bp = run_cli(
            "pack", root / "models" / "loan", "-o", tmp_path / "c", "--provenance", bad_prov, check=False
        )
        assert bp.returncode == 2 and f"{bad_prov}: seeds.a:" in bp.stderr and not (tmp_path / "c").exists()
    finally:
        os.environ.pop("BASTION_SIGNING_PASSPHRASE", None)
