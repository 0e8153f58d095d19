"""The bundle layout. A bundle is a directory:

    manifest.json   the serving manifest (inputs, outputs, runtime)
    <model file>    the weights, AES-256-GCM sealed when the bundle is encrypted
    bundle.json     every file with its SHA-256, provenance, environment lock, golden samples
    model.sig       OpenSSF model-signing signature (sigstore bundle, DSSE, ECDSA P-256)

A bundle is content-addressed by the SHA-256 of its bundle.json, which lists the
digest of every other file.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

BUNDLE_FILE = "bundle.json"
SIGNATURE_FILE = "model.sig"
FORMAT_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileEntry(_Strict):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)
    encrypted: bool = False


class Environment(_Strict):
    python: str
    platform: str
    packages: dict[str, str]


class Golden(_Strict):
    inputs: dict[str, list[Any]]  # nested lists, one entry per declared input
    probabilities: list[list[float]]
    tolerance: float = Field(gt=0)


class Provenance(_Strict):
    created_by: str
    created_at: str
    training_data_sha256: str | None = None
    preprocessing: list[str] = Field(default_factory=list)
    seeds: dict[str, int] = Field(default_factory=dict)
    training_config: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)


class Encryption(_Strict):
    algorithm: str = "AES-256-GCM"
    key_id: str  # which key-encryption key wrapped the data key (its fingerprint)
    wrapped_key: str  # base64: nonce || AES-GCM(KEK, data key)


class BundleManifest(_Strict):
    format: int = FORMAT_VERSION
    name: str
    version: str
    runtime: str
    files: dict[str, FileEntry]
    environment: Environment
    golden: Golden
    provenance: Provenance
    encryption: Encryption | None = None
    # Private prediction: teacher models trained on disjoint partitions of the training data.
    teachers: list[str] = Field(default_factory=list)
    # A server-side reference dataset (.npz, one array per input) for aggregate statistics.
    reference: str | None = None
