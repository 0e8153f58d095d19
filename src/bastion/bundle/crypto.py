"""Encryption at rest: AES-256-GCM per file under a per-bundle data key, wrapped by a key-encryption key.

`KeyProvider` is the seam for a KMS or Vault transit backend: it only wraps and
unwraps data keys. Plaintext weights exist only in memory; nothing decrypted is
ever written to disk.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bastion.errors import BastionException

_NONCE = 12


class DecryptionFailed(BastionException):
    """Wrong key, or the ciphertext was changed. Deliberately says no more."""


class KeyProvider(Protocol):
    key_id: str

    def wrap(self, data_key: bytes, *, context: bytes) -> bytes: ...

    def unwrap(self, wrapped: bytes, *, context: bytes) -> bytes: ...


class LocalKeyProvider:
    """A 256-bit key-encryption key from a file or an environment variable (base64)."""

    def __init__(self, kek: bytes) -> None:
        if len(kek) != 32:
            raise ValueError("a key-encryption key must be 32 bytes (base64 of 32 random bytes)")
        self._aead = AESGCM(kek)
        self.key_id = "kek:" + hashlib.sha256(b"bastion-kek-id" + kek).hexdigest()[:16]

    @classmethod
    def from_spec(cls, spec: str, *, base: Path | None = None) -> LocalKeyProvider:
        """`env:NAME` or `file:PATH` (relative to `base`)."""
        kind, _, value = spec.partition(":")
        if kind == "env":
            raw = os.environ.get(value)
            if not raw:
                raise ValueError(f"environment variable {value} is not set")
        elif kind == "file":
            path = Path(value) if base is None else base / value
            try:
                raw = path.read_text(encoding="ascii").strip()
            except (OSError, UnicodeDecodeError) as e:
                raise ValueError(f"{path}: cannot read the key file: {e}") from None
        else:
            # Not repeated: a key pasted where its location belongs would be printed in the error.
            raise ValueError("a key spec must read 'env:NAME' or 'file:PATH' (the value given is not shown)")
        try:
            return cls(base64.b64decode(raw, validate=True))
        except ValueError as e:
            raise ValueError(f"key from {kind}:{value} is not base64 of 32 bytes: {e}") from None

    def wrap(self, data_key: bytes, *, context: bytes) -> bytes:
        nonce = secrets.token_bytes(_NONCE)
        return nonce + self._aead.encrypt(nonce, data_key, context)

    def unwrap(self, wrapped: bytes, *, context: bytes) -> bytes:
        try:
            return self._aead.decrypt(wrapped[:_NONCE], wrapped[_NONCE:], context)
        except (InvalidTag, ValueError):
            raise DecryptionFailed("the data key does not open with this key-encryption key") from None


def new_kek() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


def seal(data_key: bytes, plaintext: bytes, *, context: bytes) -> bytes:
    nonce = secrets.token_bytes(_NONCE)
    return nonce + AESGCM(data_key).encrypt(nonce, plaintext, context)


def unseal(data_key: bytes, sealed: bytes, *, context: bytes) -> bytes:
    try:
        return AESGCM(data_key).decrypt(sealed[:_NONCE], sealed[_NONCE:], context)
    except (InvalidTag, ValueError):
        raise DecryptionFailed("the file does not decrypt: wrong key or changed ciphertext") from None
