"""The chain's arithmetic, shared by the writer and the verifier.

record hash = SHA-256(previous record's hash || canonical JSON body), where the
body carries its own sequence number. Anyone can recompute it; the writer's
Ed25519 signature over (seq, hash) in each checkpoint pins the chain so that a
rewrite of earlier records with recomputed hashes is caught too.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from bastion.statedir import make_private_dir

GENESIS = "0" * 64

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    seq       INTEGER PRIMARY KEY,
    body      TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    seq       INTEGER PRIMARY KEY,
    hash      TEXT NOT NULL,
    signed_at REAL NOT NULL,
    signature TEXT NOT NULL
);
"""


def encode_body(body: dict[str, Any]) -> bytes:
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)


def chain_hash(prev_hash: str, body: bytes) -> str:
    return hashlib.sha256(prev_hash.encode("ascii") + body).hexdigest()


def checkpoint_message(seq: int, record_hash: str) -> bytes:
    return f"bastion-audit-checkpoint:v1:{seq}:{record_hash}".encode("ascii")


def load_or_create_audit_key(private_path: Path) -> Ed25519PrivateKey:
    """The checkpoint signing key (PEM, owner-only) and its public half beside it (`.pub`)."""
    if private_path.exists():
        key = serialization.load_pem_private_key(private_path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{private_path}: not an Ed25519 private key")
        return key
    key = Ed25519PrivateKey.generate()
    make_private_dir(private_path.parent)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    private_path.touch(mode=0o600, exist_ok=False)
    private_path.write_bytes(pem)
    public_path(private_path).write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return key


def public_path(private_path: Path) -> Path:
    return private_path.with_suffix(".pub")


def load_public_key(path: Path) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(path.read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path}: not an Ed25519 public key")
    return key
