"""The chain's arithmetic, shared by the writer and the verifier.

record hash = SHA-256(previous record's hash || canonical JSON body), where the
body carries its own sequence number. Anyone can recompute it; the writer's
Ed25519 signature over (seq, hash) in each checkpoint pins the chain so that a
rewrite of earlier records with recomputed hashes is caught too.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
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


Row = tuple[int, str, str, str]  # seq, body (canonical JSON), prev_hash, hash
Checkpoint = tuple[int, str, float, str]  # seq, hash, signed_at (Unix seconds), signature (hex)


@dataclass(frozen=True, slots=True)
class Tail:
    """What a writer reads inside its lock before it extends the chain: the last record and the
    last signed checkpoint (0, GENESIS and 0, 0.0 for an empty log)."""

    seq: int
    hash: str
    checkpoint_seq: int
    checkpoint_at: float


class ChainExtender:
    """Links a batch of record bodies onto a tail and signs the checkpoints that fall due.

    The same arithmetic for every sink: the sink serialises writers (a lock held across reading
    the tail, inserting and committing) and this object decides the rows. A checkpoint is due
    after `every_records` records since the last one, after `every_seconds` since the last one
    was signed (by any writer), and at `final` (a writer's shutdown) when records follow the last.
    """

    def __init__(self, key: Ed25519PrivateKey, *, every_records: int, every_seconds: float) -> None:
        self._key = key
        self._every_records = every_records
        self._every_seconds = every_seconds

    def extend(
        self, tail: Tail, bodies: list[dict[str, Any]], now: float, *, final: bool = False
    ) -> tuple[list[Row], list[Checkpoint]]:
        """Each body gets its `seq` (set in the dict too); returns the rows and checkpoints to insert."""
        rows: list[Row] = []
        checkpoints: list[Checkpoint] = []
        seq, head, last_cp = tail.seq, tail.hash, tail.checkpoint_seq
        for body in bodies:
            seq += 1
            body["seq"] = seq
            encoded = encode_body(body)
            digest = chain_hash(head, encoded)
            rows.append((seq, encoded.decode(), head, digest))
            head = digest
            if seq - last_cp >= self._every_records:  # at most N records between checkpoints
                checkpoints.append(self.sign(seq, head, now))
                last_cp = seq
        # By time: `every_seconds` since the last checkpoint (a log without one gets its first by count,
        # at `final`, or from the writer's idle timer, which passes `final`).
        since = now - tail.checkpoint_at if tail.checkpoint_seq else 0.0
        if seq > last_cp and (final or since >= self._every_seconds):
            checkpoints.append(self.sign(seq, head, now))
        return rows, checkpoints

    def sign(self, seq: int, record_hash: str, now: float) -> Checkpoint:
        return (seq, record_hash, now, self._key.sign(checkpoint_message(seq, record_hash)).hex())


def encode_body(body: dict[str, Any]) -> bytes:
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)


def chain_hash(prev_hash: str, body: bytes) -> str:
    return hashlib.sha256(prev_hash.encode("ascii") + body).hexdigest()


def checkpoint_message(seq: int, record_hash: str) -> bytes:
    return f"bastion-audit-checkpoint:v1:{seq}:{record_hash}".encode("ascii")


def load_or_create_audit_key(private_path: Path) -> Ed25519PrivateKey:
    """The checkpoint signing key (PEM, owner-only) and its public half beside it (`.pub`).

    Several processes may start on one fresh state directory at once (`bastion serve --workers`):
    the key is written to a temporary file and linked into place, so one key wins and every
    process loads that one, never a half-written file. Raises ValueError for a file that is not
    an Ed25519 private key."""
    if not private_path.exists():
        key = Ed25519PrivateKey.generate()
        make_private_dir(private_path.parent)
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        public_pem = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        tmp = private_path.with_name(f".{private_path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, private_path)  # fails if another process got there first: its key stands
            public_path(private_path).write_bytes(public_pem)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    loaded = serialization.load_pem_private_key(private_path.read_bytes(), password=None)
    if not isinstance(loaded, Ed25519PrivateKey):
        raise ValueError(f"{private_path}: not an Ed25519 private key")
    return loaded


def public_path(private_path: Path) -> Path:
    return private_path.with_suffix(".pub")


def load_public_key(path: Path) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(path.read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path}: not an Ed25519 public key")
    return key
