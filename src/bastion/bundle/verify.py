"""Verify a bundle before it serves, failing closed with the exact difference.

Steps, in order; the first failure refuses the model:
1. bundle.json is well formed;
2. the signature is valid and made by a key the config trusts for this model;
3. the files on disk are exactly the signed files (none missing, none extra) and each
   hashes to its signed digest and to the digest bundle.json lists (one pass over each file);
4. the environment matches the lock (a difference in a package named in `allow_env_drift`
   is a warning instead);
5. encrypted files decrypt in memory with the configured key-encryption key;
6. the model loads (pickle still refused unless trusted, and then scanned);
7. the golden samples give the recorded outputs within the recorded tolerance.
Signature and digest failures can never be downgraded.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from bastion.bundle.crypto import DecryptionFailed, KeyProvider, unseal
from bastion.bundle.environment import differences
from bastion.bundle.format import BUNDLE_FILE, SIGNATURE_FILE, BundleManifest
from bastion.bundle.hashing import hash_files, list_files
from bastion.bundle.pack import data_key_context, file_context
from bastion.bundle.signing import SignatureError, signed_digests
from bastion.errors import ModelLoadError
from bastion.manifest import MANIFEST_NAME, Manifest, read_manifest
from bastion.runtimes import ModelRuntime, load_runtime
from bastion.runtimes.teachers import TeacherEnsemble

log = logging.getLogger("bastion.bundle")


class BundleRefused(ModelLoadError):
    """A bundle failed verification. `reason` is a stable code for the audit log."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class TrustPolicy:
    trusted_keys: list[Path] = field(default_factory=list)
    allow_env_drift: frozenset[str] = frozenset()
    unsafe_trust_pickle: bool = False
    unsafe_unsigned: bool = False
    kek: KeyProvider | None = None


@dataclass(frozen=True)
class VerifiedBundle:
    manifest: Manifest
    runtime: ModelRuntime
    digest: str  # sha256 of bundle.json: the bundle's content address
    signer: Path | None
    warnings: list[str]
    teachers: TeacherEnsemble | None = None
    reference: dict[str, np.ndarray] | None = None


def is_bundle(path: Path) -> bool:
    return (path / BUNDLE_FILE).is_file()


def verify_bundle(bundle: Path, policy: TrustPolicy, *, progress: bool | None = False) -> VerifiedBundle:
    warnings: list[str] = []
    # 1. bundle.json
    try:
        raw = (bundle / BUNDLE_FILE).read_bytes()
        info = BundleManifest.model_validate_json(raw)
    except (OSError, ValidationError) as e:
        raise BundleRefused(
            f"{bundle / BUNDLE_FILE}: not a valid bundle description: {_first_line(e)}",
            reason="bundle_malformed",
        ) from None
    # 2. signature
    signer: Path | None = None
    signed: dict[str, str] | None = None
    if policy.unsafe_unsigned and not (bundle / SIGNATURE_FILE).exists():
        warnings.append(f"{bundle}: UNSAFE: serving an unsigned bundle (unsafe_unsigned = true)")
    else:
        try:
            signed, signer = signed_digests(bundle, policy.trusted_keys)
        except SignatureError as e:
            raise BundleRefused(str(e), reason="signature_invalid") from None
    # 3. files: exactly the signed set, each matching its digests
    try:
        on_disk = list_files(bundle, exclude={SIGNATURE_FILE})
    except ValueError as e:
        raise BundleRefused(str(e), reason="extra_file") from None
    listed = set(info.files) | {BUNDLE_FILE}
    expected = set(signed) if signed is not None else listed
    for name in on_disk:
        if name not in expected:
            raise BundleRefused(
                f"{bundle / name}: extra file, not covered by the signature", reason="extra_file"
            )
    for name in sorted(expected | listed):
        if name not in on_disk:
            raise BundleRefused(f"{bundle / name}: missing file", reason="missing_file")
    if signed is not None and set(signed) != listed:
        odd = sorted(set(signed) ^ listed)
        raise BundleRefused(
            f"{bundle / BUNDLE_FILE}: lists files other than the signed ones: {', '.join(odd)}",
            reason="digest_mismatch",
        )
    digests = hash_files(bundle, on_disk, label=f"verifying {info.name}", progress=progress)
    for name in sorted(on_disk):
        want = (
            signed[name] if signed is not None else (info.files[name].sha256 if name in info.files else None)
        )
        if want is not None and digests[name] != want:
            raise BundleRefused(
                f"{bundle / name}: digest mismatch: signed sha256 {want[:16]}..., found {digests[name][:16]}...",
                reason="digest_mismatch",
            )
        entry = info.files.get(name)
        if entry is not None and digests[name] != entry.sha256:
            raise BundleRefused(
                f"{bundle / name}: digest differs from {BUNDLE_FILE}", reason="digest_mismatch"
            )
    manifest = read_manifest(bundle)
    if (manifest.name, manifest.version, manifest.runtime) != (info.name, info.version, info.runtime):
        raise BundleRefused(
            f"{bundle / MANIFEST_NAME}: name, version or runtime differs from {BUNDLE_FILE}",
            reason="digest_mismatch",
        )
    # 4. environment lock
    for what, locked, here in differences(info.environment, _env_for(info)):
        message = f"{bundle}: environment differs: {what} is {here} here, {locked} in the bundle's lock"
        if what in policy.allow_env_drift:
            warnings.append(message + " (allowed by allow_env_drift)")
        else:
            raise BundleRefused(message, reason="environment_mismatch")
    # 5. decryption, in memory only
    data = (bundle / manifest.file).read_bytes()
    if info.files[manifest.file].encrypted:
        data = _decrypt(bundle, info, manifest, data, policy.kek)
    # 6. load
    try:
        runtime = load_runtime(bundle, manifest, data, unsafe_trust_pickle=policy.unsafe_trust_pickle)
    except ModelLoadError as e:
        raise BundleRefused(str(e), reason="model_refused") from None
    teachers = None
    if info.teachers:
        from bastion.runtimes.sklearn import SklearnRuntime
        from bastion.runtimes.teachers import TeacherEnsemble

        loaded = []
        for name in info.teachers:
            blob = (bundle / name).read_bytes()
            if info.files[name].encrypted:
                blob = _decrypt(bundle, info, manifest, blob, policy.kek, file=name)
            try:
                loaded.append(SklearnRuntime.from_skops(bundle / name, blob, manifest))
            except ModelLoadError as e:
                raise BundleRefused(str(e), reason="model_refused") from None
        teachers = TeacherEnsemble(loaded, manifest.outputs.width)
    reference = None
    if info.reference is not None:
        blob = (bundle / info.reference).read_bytes()
        if info.files[info.reference].encrypted:
            blob = _decrypt(bundle, info, manifest, blob, policy.kek, file=info.reference)
        try:
            with np.load(io.BytesIO(blob), allow_pickle=False) as arrays:
                reference = {s.name: np.asarray(arrays[s.name], dtype=s.numpy_dtype) for s in manifest.inputs}
        except (ValueError, KeyError, OSError) as e:
            raise BundleRefused(
                f"{bundle / info.reference}: unreadable reference data: {e}", reason="model_refused"
            ) from None
    # 7. golden samples
    _check_golden(bundle, info, manifest, runtime)
    for w in warnings:
        log.warning(w)
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    return VerifiedBundle(manifest, runtime, digest, signer, warnings, teachers, reference)


def _env_for(info: BundleManifest):  # type: ignore[no-untyped-def]
    from bastion.bundle.environment import current_environment

    return current_environment(info.runtime)


def _decrypt(
    bundle: Path,
    info: BundleManifest,
    manifest: Manifest,
    data: bytes,
    kek: KeyProvider | None,
    *,
    file: str = "",
) -> bytes:
    if info.encryption is None:
        raise BundleRefused(
            f"{bundle / BUNDLE_FILE}: a file is marked encrypted but no key is recorded",
            reason="bundle_malformed",
        )
    if kek is None:
        raise BundleRefused(
            f"{bundle}: encrypted, and no decryption_key is configured for it", reason="decryption_failed"
        )
    if kek.key_id != info.encryption.key_id:
        raise BundleRefused(
            f"{bundle}: encrypted for key {info.encryption.key_id}, configured key is {kek.key_id}",
            reason="decryption_failed",
        )
    try:
        wrapped = base64.b64decode(info.encryption.wrapped_key, validate=True)
        data_key = kek.unwrap(wrapped, context=data_key_context(info.name, info.version))
        return unseal(data_key, data, context=file_context(info.name, info.version, file or manifest.file))
    except (DecryptionFailed, binascii.Error) as e:
        raise BundleRefused(f"{bundle}: {e}", reason="decryption_failed") from None


def _check_golden(bundle: Path, info: BundleManifest, manifest: Manifest, runtime: ModelRuntime) -> None:
    try:
        inputs = {
            s.name: np.asarray(info.golden.inputs[s.name], dtype=s.numpy_dtype) for s in manifest.inputs
        }
        got = np.asarray(runtime.predict(inputs), dtype=np.float64)
    except Exception as e:  # a model that cannot even run its own golden samples
        raise BundleRefused(
            f"{bundle}: golden samples could not run: {type(e).__name__}", reason="golden_mismatch"
        ) from None
    want = np.asarray(info.golden.probabilities, dtype=np.float64)
    if got.shape != want.shape:
        raise BundleRefused(
            f"{bundle}: golden outputs have shape {got.shape}, recorded {want.shape}",
            reason="golden_mismatch",
        )
    diff = np.abs(got - want).max(axis=1)
    bad = np.flatnonzero(diff > info.golden.tolerance)
    if bad.size:
        i = int(bad[0])
        raise BundleRefused(
            f"{bundle}: golden sample {i} differs by {diff[i]:.3g} (tolerance {info.golden.tolerance:g}); "
            f"{bad.size} of {len(diff)} samples differ",
            reason="golden_mismatch",
        )


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__
