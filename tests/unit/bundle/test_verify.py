"""Bundles from the supply-chain attacker's side: every change to a signed bundle refuses the model,
with the precise reason."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from bastion.bundle.crypto import LocalKeyProvider
from bastion.bundle.format import BUNDLE_FILE
from bastion.bundle.pack import pack
from bastion.bundle.signing import generate_signing_key, sign_bundle
from bastion.bundle.verify import BundleRefused, TrustPolicy, verify_bundle
from bastion.config import ModelRef
from bastion.registry import ModelRegistry
from tests.helpers import write_test_deployment

MARKER = Path("/tmp/bastion-bundle-pickle-payload-ran")


class _Payload:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (MARKER.touch, ())


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    _, build = write_test_deployment(tmp_path_factory.mktemp("bundles"))
    return build


def _policy(demo, **kw) -> TrustPolicy:  # type: ignore[no-untyped-def]
    return TrustPolicy(trusted_keys=[demo.root / "keys" / "release.pub"], **kw)


def _copy(demo, name: str, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    dst = tmp_path / name
    shutil.copytree(demo.root / "bundles" / name, dst)
    for p in dst.rglob("*"):
        p.chmod(0o644)  # the attacker can write the files
    return dst


def _refused(bundle: Path, policy: TrustPolicy) -> BundleRefused:
    with pytest.raises(BundleRefused) as err:
        verify_bundle(bundle, policy)
    return err.value


def _resign(demo, bundle: Path) -> None:  # type: ignore[no-untyped-def]
    (bundle / "model.sig").unlink()
    sign_bundle(bundle, demo.signing_key, demo.passphrase)


def _edit_bundle_json(bundle: Path, edit) -> None:  # type: ignore[no-untyped-def]
    doc = json.loads((bundle / BUNDLE_FILE).read_text())
    edit(doc)
    (bundle / BUNDLE_FILE).write_text(json.dumps(doc))


def test_intact_bundle_verifies(demo) -> None:  # type: ignore[no-untyped-def]
    v = verify_bundle(demo.root / "bundles" / "breast-cancer-1", _policy(demo))
    assert v.digest.startswith("sha256:") and v.signer == demo.root / "keys" / "release.pub"
    assert v.warnings == []


def test_flipped_byte_in_the_model_file(demo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bundle = _copy(demo, "breast-cancer-1", tmp_path)
    data = bytearray((bundle / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (bundle / "model.onnx").write_bytes(bytes(data))
    err = _refused(bundle, _policy(demo))
    assert err.reason == "digest_mismatch" and "model.onnx: digest mismatch" in str(err)


def test_replaced_manifest(demo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bundle = _copy(demo, "breast-cancer-1", tmp_path)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["inputs"][0]["max"] = [1e9] * 30  # widen the guard's ranges
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    err = _refused(bundle, _policy(demo))
    assert err.reason == "digest_mismatch" and "manifest.json" in str(err)


def test_replaced_bundle_description(demo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bundle = _copy(demo, "breast-cancer-1", tmp_path)
    _edit_bundle_json(bundle, lambda d: d["golden"].update(tolerance=1.0))
    err = _refused(bundle, _policy(demo))
    assert err.reason == "digest_mismatch" and "bundle.json" in str(err)


def test_signature_from_an_untrusted_key(demo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bundle = _copy(demo, "breast-cancer-1", tmp_path)
    mallory = generate_signing_key(tmp_path / "mallory.key", b"mallory-passphrase")
    (bundle / "model.sig").unlink()
    sign_bundle(bundle, tmp_path / "mallory.key", b"mallory-passphrase")
    err = _refused(bundle, _policy(demo))
    assert err.reason == "signature_invalid" and "not signed by a trusted key" in str(err)
    assert (
        verify_bundle(bundle, TrustPolicy(trusted_keys=[mallory])).signer == mallory
    )  # it is a real signature


def test_no_trusted_keys_configured_fails_closed(demo) -> None:  # type: ignore[no-untyped-def]
    err = _refused(demo.root / "bundles" / "breast-cancer-1", TrustPolicy())
    assert err.reason == "signature_invalid" and "no trusted keys" in str(err)


def test_deleted_file(demo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bundle = _copy(demo, "breast-cancer-1", tmp_path)
    (bundle / "model.onnx").unlink()
    err = _refused(bundle, _policy(demo))
    assert err.reason == "missing_file" and "model.onnx: missing file" in str(err)


def test_extra_file(demo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bundle = _copy(demo, "breast-cancer-1", tmp_path)
    (bundle / "backdoor.py").write_text("import os\n")
    err = _refused(bundle, _policy(demo))
    assert err.reason == "extra_file" and "backdoor.py: extra file" in str(err)


def test_missing_signature(demo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bundle = _copy(demo, "breast-cancer-1", tmp_path)
    (bundle / "model.sig").unlink()
    assert _refused(bundle, _policy(demo)).reason == "signature_invalid"
    unsigned = verify_bundle(bundle, _policy(demo, unsafe_unsigned=True))
    assert "UNSAFE" in unsigned.warnings[0]
    (bundle / "model.onnx").write_bytes(b"x")  # digests still hold without a signature
    assert _refused(bundle, _policy(demo, unsafe_unsigned=True)).reason == "digest_mismatch"


def test_golden_sample_that_no_longer_matches(demo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """As if the runtime here computed other outputs than at pack time (signed by the real key)."""
    bundle = _copy(demo, "breast-cancer-1", tmp_path)

    def drift(doc: dict) -> None:
        doc["golden"]["probabilities"][3][0] += 0.0125
        doc["golden"]["probabilities"][3][1] -= 0.0125

    _edit_bundle_json(bundle, drift)
    _resign(demo, bundle)
    err = _refused(bundle, _policy(demo))
    assert err.reason == "golden_mismatch"
    assert "golden sample 3 differs by 0.0125 (tolerance 1e-05)" in str(err)


def test_environment_lock_that_disagrees(demo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bundle = _copy(demo, "breast-cancer-1", tmp_path)
    _edit_bundle_json(bundle, lambda d: d["environment"]["packages"].update(numpy="1.0.0"))
    _resign(demo, bundle)
    err = _refused(bundle, _policy(demo))
    assert err.reason == "environment_mismatch"
    assert f"numpy is {np.__version__} here, 1.0.0 in the bundle's lock" in str(err)
    allowed = verify_bundle(bundle, _policy(demo, allow_env_drift=frozenset({"numpy"})))
    assert "allowed by allow_env_drift" in allowed.warnings[0]
    # Only the named package may drift.
    _edit_bundle_json(bundle, lambda d: d["environment"]["packages"].update(onnxruntime="0.1"))
    _resign(demo, bundle)
    assert (
        _refused(bundle, _policy(demo, allow_env_drift=frozenset({"numpy"}))).reason == "environment_mismatch"
    )


def test_encrypted_bundle_needs_the_right_key(demo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bundle = demo.root / "bundles" / "breast-cancer-skops-1"
    kek = LocalKeyProvider.from_spec(f"file:{demo.root / 'keys' / 'kek.key'}")
    ok = verify_bundle(bundle, _policy(demo, kek=kek))
    x = np.asarray(demo.features[:5], dtype=np.float32)
    np.testing.assert_allclose(ok.runtime.predict({"features": x}), demo.estimator.predict_proba(x))
    # The weights on disk are ciphertext: the plaintext skops file is nowhere in the bundle.
    plaintext = (demo.root / "models" / "breast-cancer-skops" / "model.skops").read_bytes()
    assert plaintext[100:164] not in (bundle / "model.skops").read_bytes()
    assert _refused(bundle, _policy(demo)).reason == "decryption_failed"
    wrong = LocalKeyProvider(os.urandom(32))
    assert _refused(bundle, _policy(demo, kek=wrong)).reason == "decryption_failed"


def test_wrong_key_with_a_forged_key_id_still_fails(demo) -> None:  # type: ignore[no-untyped-def]
    bundle = demo.root / "bundles" / "breast-cancer-skops-1"
    wrong = LocalKeyProvider(os.urandom(32))
    wrong.key_id = json.loads((bundle / BUNDLE_FILE).read_text())["encryption"]["key_id"]
    err = _refused(bundle, _policy(demo, kek=wrong))
    assert err.reason == "decryption_failed" and "does not open" in str(err)


def _pickle_bundle(demo, tmp_path: Path, payload: object) -> Path:  # type: ignore[no-untyped-def]
    src = tmp_path / "src"
    shutil.copytree(demo.root / "models" / "breast-cancer-skops", src)
    manifest = json.loads((src / "manifest.json").read_text())
    manifest.update(file="model.pkl", name="pickled")
    (src / "manifest.json").write_text(json.dumps(manifest))
    (src / "model.skops").unlink()
    (src / "model.pkl").write_bytes(pickle.dumps(payload))
    return src


def test_pickle_refused_by_default_and_loaded_only_when_trusted(demo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src = _pickle_bundle(demo, tmp_path, demo.estimator)
    bundle = tmp_path / "pickled-1"
    pack(src, bundle)
    sign_bundle(bundle, demo.signing_key, demo.passphrase)
    err = _refused(bundle, _policy(demo))
    assert err.reason == "model_refused" and "format 'pickle' refused" in str(err)
    assert verify_bundle(bundle, _policy(demo, unsafe_trust_pickle=True)).manifest.name == "pickled"


def test_malicious_pickle_refused_even_when_trusted(demo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    MARKER.unlink(missing_ok=True)
    src = _pickle_bundle(demo, tmp_path, _Payload())
    with pytest.raises(Exception, match="pickle refused: it imports"):
        pack(src, tmp_path / "never")  # packing scans too
    bundle = _copy(demo, "breast-cancer-skops-1", tmp_path)  # a signed bundle whose file is swapped...
    shutil.rmtree(bundle)
    shutil.copytree(src, bundle)  # ...for an unsigned directory holding the payload
    _edit_bundle_json_from(demo, bundle)
    err = _refused(bundle, _policy(demo, unsafe_trust_pickle=True, unsafe_unsigned=True))
    assert err.reason == "model_refused" and "pickle refused: it imports" in str(err)
    assert not MARKER.exists(), "the pickle payload ran"


def _edit_bundle_json_from(demo, bundle: Path) -> None:  # type: ignore[no-untyped-def]
    """Give a directory a bundle.json that lists its files (as an attacker with write access could)."""
    import hashlib

    doc = json.loads((demo.root / "bundles" / "breast-cancer-skops-1" / BUNDLE_FILE).read_text())
    doc.update(name="pickled", encryption=None)
    doc["files"] = {
        p.name: {
            "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
            "size": p.stat().st_size,
            "encrypted": False,
        }
        for p in bundle.iterdir()
    }
    (bundle / BUNDLE_FILE).write_text(json.dumps(doc))


def test_plain_directory_needs_unsafe_unsigned(demo) -> None:  # type: ignore[no-untyped-def]
    plain = demo.root / "models" / "breast-cancer"
    registry = ModelRegistry.load([ModelRef(path=plain)])
    assert "not a signed bundle" in registry.failures[str(plain)]
    assert registry.events[0].reason == "not_a_bundle"
    assert ModelRegistry.load([ModelRef(path=plain, unsafe_unsigned=True)]).names == {"breast-cancer"}


def test_bundles_are_immutable_and_packing_is_atomic(demo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(FileExistsError):
        pack(demo.root / "models" / "breast-cancer", demo.root / "bundles" / "breast-cancer-1")
    bad = tmp_path / "bad"
    shutil.copytree(demo.root / "models" / "breast-cancer", bad)
    (bad / "model.onnx").write_bytes(b"garbage")
    with pytest.raises(Exception, match="not a loadable ONNX model"):
        pack(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))  # nothing half-written
    bundle = demo.root / "bundles" / "breast-cancer-1"
    assert all(oct(p.stat().st_mode & 0o777) == "0o444" for p in bundle.iterdir() if p.name != "model.sig")


def test_interoperates_with_openssf_model_signing(demo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from model_signing import hashing, signing, verifying

    # Bastion signed it; the model-signing library verifies it.
    ours = demo.root / "bundles" / "breast-cancer-1"
    verifying.Config().use_elliptic_key_verifier(
        public_key=demo.root / "keys" / "release.pub"
    ).set_hashing_config(hashing.Config().use_file_serialization(ignore_paths=[ours / "model.sig"])).verify(
        ours, ours / "model.sig"
    )
    # The model-signing library signed it; Bastion verifies it.
    theirs = _copy(demo, "breast-cancer-1", tmp_path)
    (theirs / "model.sig").unlink()
    signing.Config().use_elliptic_key_signer(
        private_key=demo.signing_key, password=demo.passphrase
    ).set_hashing_config(hashing.Config().use_file_serialization(ignore_paths=[theirs / "model.sig"])).sign(
        theirs, theirs / "model.sig"
    )
    assert verify_bundle(theirs, _policy(demo)).manifest.name == "breast-cancer"
    # And a tampered file fails in both.
    (theirs / "model.onnx").write_bytes(b"\0" + (theirs / "model.onnx").read_bytes()[1:])
    assert _refused(theirs, _policy(demo)).reason == "digest_mismatch"
    with pytest.raises(ValueError, match="mismatch"):
        verifying.Config().use_elliptic_key_verifier(
            public_key=demo.root / "keys" / "release.pub"
        ).set_hashing_config(
            hashing.Config().use_file_serialization(ignore_paths=[theirs / "model.sig"])
        ).verify(theirs, theirs / "model.sig")


def test_signing_shows_progress_on_a_terminal(
    demo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    bundle = _copy(demo, "breast-cancer-1", tmp_path)
    (bundle / "model.sig").unlink()
    sign_bundle(bundle, demo.signing_key, demo.passphrase, progress=True)
    err = capsys.readouterr().err
    assert "signing breast-cancer-1 [" in err and "100%" in err
    assert verify_bundle(bundle, _policy(demo)).manifest.name == "breast-cancer"
