"""Signatures in the OpenSSF model-signing format (sigstore bundle, DSSE over an in-toto
statement listing every file's SHA-256), with ECDSA P-256 keys.

Signing goes through the `model_signing` library itself, so its CLI and API verify our
bundles. Verification checks the signature with the library's key verifier and
returns the signed digests; the caller compares them with its own single pass over
the files, so that each file is hashed once and a mismatch names the file.
"""

from __future__ import annotations

import pathlib
from pathlib import Path, PurePosixPath

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bastion.bundle.format import SIGNATURE_FILE
from bastion.bundle.hashing import hash_files, list_files
from bastion.errors import BastionException
from bastion.files import write_private_file

PASSPHRASE_ENV = "BASTION_SIGNING_PASSPHRASE"  # noqa: S105 (the variable's name, not a secret)


class SignatureError(BastionException):
    """The signature is missing, malformed, or made by no trusted key."""


def generate_signing_key(private_path: Path, passphrase: bytes) -> Path:
    """Write an encrypted P-256 private key (PEM, 0600) and its public key beside it (`.pub`)."""
    if len(passphrase) < 8:
        raise ValueError("the passphrase must have at least 8 characters")
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase),
    )
    write_private_file(private_path, pem)
    public_path = private_path.with_suffix(".pub")
    public_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return public_path


class _OurHashing:
    """Stands in for model-signing's hashing config: our one pass over the files, with a progress
    bar on a terminal, producing the very manifest model-signing's per-file serialization would."""

    def __init__(self, progress: bool | None) -> None:
        self._progress = progress

    def hash(self, model_path: Path) -> object:
        from model_signing import manifest
        from model_signing._hashing.hashing import Digest

        root = Path(model_path)
        names = list_files(root, exclude={SIGNATURE_FILE})
        digests = hash_files(root, names, label=f"signing {root.name}", progress=self._progress)
        items = [
            manifest.FileManifestItem(
                path=PurePosixPath(n), digest=Digest("sha256", bytes.fromhex(digests[n]))
            )
            for n in names
        ]
        serialization = manifest._FileSerialization("sha256", False, [Path(SIGNATURE_FILE)])
        return manifest.Manifest(root.name, items, serialization)


def sign_bundle(
    bundle: Path, private_key: Path, passphrase: bytes | None, *, progress: bool | None = False
) -> Path:
    from model_signing import signing

    signature = bundle / SIGNATURE_FILE
    try:
        # model-signing annotates the password as str but hands it to cryptography, which wants bytes.
        signer = signing.Config().use_elliptic_key_signer(  # type: ignore[no-untyped-call]
            private_key=private_key,
            password=passphrase,  # type: ignore[arg-type]
        )
        signer.set_hashing_config(_OurHashing(progress)).sign(bundle, signature)  # type: ignore[arg-type]
    except (ValueError, TypeError) as e:
        raise SignatureError(f"{private_key}: cannot sign with this key: {e}") from None
    return signature


def signed_digests(bundle: Path, trusted_keys: list[Path]) -> tuple[dict[str, str], Path]:
    """Check the signature against each trusted key; return the signed {file: sha256} and the key used."""
    from model_signing._signing import sign_ec_key, sign_sigstore_pb

    signature_path = bundle / SIGNATURE_FILE
    if not signature_path.is_file():
        raise SignatureError(f"{signature_path}: no signature")
    if not trusted_keys:
        raise SignatureError("no trusted keys are configured for this model")
    try:
        signature = sign_sigstore_pb.Signature.read(pathlib.Path(signature_path))
    except Exception as e:  # protobuf/JSON errors of every kind
        raise SignatureError(f"{signature_path}: malformed signature ({type(e).__name__})") from None
    for key_path in trusted_keys:
        try:
            manifest = sign_ec_key.Verifier(pathlib.Path(key_path)).verify(signature)
        except Exception:  # noqa: S112 (wrong key or bad signature: the next trusted key may fit)
            continue
        if manifest.serialization_type.get("method") != "files":
            raise SignatureError(f"{signature_path}: only per-file signatures are accepted")
        digests = {}
        for rd in manifest.resource_descriptors():
            if rd.digest.algorithm != "sha256":
                raise SignatureError(
                    f"{signature_path}: {rd.identifier} is signed with {rd.digest.algorithm}"
                )
            digests[rd.identifier] = rd.digest.digest_hex
        return digests, key_path
    names = ", ".join(str(k) for k in trusted_keys)
    raise SignatureError(f"{signature_path}: not signed by a trusted key (trusted: {names})")
