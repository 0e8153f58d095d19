"""`bastion pack`: build an immutable, content-addressed bundle from a model directory."""

from __future__ import annotations

import getpass
import hashlib
import os
import secrets
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from bastion.bundle.crypto import KeyProvider, seal
from bastion.bundle.environment import current_environment
from bastion.bundle.format import (
    BUNDLE_FILE,
    SIGNATURE_FILE,
    BundleManifest,
    Encryption,
    FileEntry,
    Golden,
    Provenance,
)
from bastion.bundle.hashing import hash_files, list_files
from bastion.manifest import MANIFEST_NAME, InputSpec, Manifest, read_manifest
from bastion.runtimes import load_runtime


def golden_inputs(manifest: Manifest, rows: int, seed: int) -> dict[str, np.ndarray]:
    """Deterministic inputs inside each input's declared domain."""
    rng = np.random.default_rng(seed)
    return {spec.name: _sample(spec, rows, rng) for spec in manifest.inputs}


def _sample(spec: InputSpec, rows: int, rng: np.random.Generator) -> np.ndarray:
    shape = [rows, *(1 if d == -1 else d for d in spec.shape[1:])]
    if spec.categories is not None:
        values = rng.choice(np.asarray(spec.categories), size=shape)
    else:
        low = np.broadcast_to(
            np.asarray(-1.0 if spec.min is None else spec.min, dtype=np.float64), shape[-1:]
        )
        high = np.broadcast_to(
            np.asarray(1.0 if spec.max is None else spec.max, dtype=np.float64), shape[-1:]
        )
        values = rng.uniform(low, high, size=shape)
        if spec.numpy_dtype.kind in "iu":
            values = np.round(values)
    return values.astype(spec.numpy_dtype)


def data_key_context(name: str, version: str) -> bytes:
    return f"bastion-bundle:{name}:{version}".encode()


def file_context(name: str, version: str, file: str) -> bytes:
    return f"bastion-bundle:{name}:{version}:{file}".encode()


def pack(
    model_dir: Path,
    out: Path,
    *,
    provenance: dict[str, Any] | None = None,
    kek: KeyProvider | None = None,
    golden_rows: int = 8,
    seed: int = 0,
    tolerance: float = 1e-5,
    progress: bool | None = None,
    teachers: int = 0,
    training_data: tuple[np.ndarray, np.ndarray] | None = None,
    reference_data: dict[str, np.ndarray] | None = None,
) -> str:
    """Write the bundle to `out` (which must not exist) and return its digest ("sha256:...").

    With `teachers` and `training_data`, also train that many clones of the (scikit-learn)
    estimator on disjoint partitions of the data, for private prediction.
    """
    if out.exists():
        raise FileExistsError(f"{out}: already exists; bundles are immutable")
    manifest = read_manifest(model_dir)
    runtime = load_runtime(model_dir, manifest, unsafe_trust_pickle=True)  # a pickle is still scanned first
    inputs = golden_inputs(manifest, golden_rows, seed)
    golden = Golden(
        inputs={k: v.tolist() for k, v in inputs.items()},
        probabilities=np.asarray(runtime.predict(inputs), dtype=np.float64).tolist(),
        tolerance=tolerance,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        names = list_files(model_dir, exclude={BUNDLE_FILE, SIGNATURE_FILE})
        teacher_files = _train_teachers(model_dir, manifest, staging, teachers, training_data, seed)
        if reference_data is not None:
            _write_reference(staging / REFERENCE_FILE, manifest, reference_data)
            teacher_files.append(REFERENCE_FILE)  # sealed, hashed and signed with the rest
        encryption = None
        data_key = secrets.token_bytes(32) if kek is not None else None
        for name in names:
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if data_key is not None and name != MANIFEST_NAME:
                context = file_context(manifest.name, manifest.version, name)
                target.write_bytes(seal(data_key, (model_dir / name).read_bytes(), context=context))
            else:
                shutil.copyfile(model_dir / name, target)
        for name in teacher_files:
            if data_key is not None:
                sealed = seal(
                    data_key,
                    (staging / name).read_bytes(),
                    context=file_context(manifest.name, manifest.version, name),
                )
                (staging / name).write_bytes(sealed)
        names += teacher_files
        if kek is not None and data_key is not None:
            wrapped = kek.wrap(data_key, context=data_key_context(manifest.name, manifest.version))
            encryption = Encryption(key_id=kek.key_id, wrapped_key=_b64(wrapped))
        digests = hash_files(staging, names, label=f"hashing {manifest.name}", progress=progress)
        files = {
            n: FileEntry(
                sha256=digests[n],
                size=(staging / n).stat().st_size,
                encrypted=encryption is not None and n != MANIFEST_NAME,
            )
            for n in names
        }
        bundle = BundleManifest(
            name=manifest.name,
            version=manifest.version,
            runtime=manifest.runtime,
            files=files,
            environment=current_environment(manifest.runtime),
            golden=golden,
            provenance=Provenance(
                created_by=getpass.getuser(),
                created_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                **(provenance or {}),
            ),
            encryption=encryption,
            teachers=[n for n in teacher_files if n != REFERENCE_FILE],
            reference=REFERENCE_FILE if reference_data is not None else None,
        )
        body = (bundle.model_dump_json(indent=2) + "\n").encode()
        (staging / BUNDLE_FILE).write_bytes(body)
        for path in staging.rglob("*"):
            if path.is_file():
                path.chmod(0o444)
        os.replace(staging, out)  # all or nothing: never a half-written bundle
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return "sha256:" + hashlib.sha256(body).hexdigest()


def _train_teachers(
    model_dir: Path,
    manifest: Manifest,
    staging: Path,
    count: int,
    training_data: tuple[np.ndarray, np.ndarray] | None,
    seed: int,
) -> list[str]:
    if count == 0:
        return []
    if manifest.runtime != "sklearn" or training_data is None or manifest.outputs.is_regression:
        raise ValueError("teachers need a scikit-learn classifier (runtime 'sklearn') and training data")
    import skops.io as sio
    from sklearn.base import clone

    x, y = training_data
    if count < 2 or count > len(x) // 2:
        raise ValueError(f"teachers must be between 2 and {len(x) // 2} for {len(x)} training rows")
    template = sio.loads(
        (model_dir / manifest.file).read_bytes(),
        trusted=sio.get_untrusted_types(data=(model_dir / manifest.file).read_bytes()),
    )
    parts = np.array_split(np.random.default_rng(seed).permutation(len(x)), count)  # disjoint
    (staging / "teachers").mkdir()
    names = []
    for i, part in enumerate(parts):
        teacher = clone(template).fit(x[part], y[part])
        name = f"teachers/teacher-{i:03d}.skops"
        (staging / name).write_bytes(sio.dumps(teacher))
        names.append(name)
    return names


REFERENCE_FILE = "reference.npz"


def _write_reference(path: Path, manifest: Manifest, data: dict[str, np.ndarray]) -> None:
    """One array per declared input, in its declared datatype (np.savez: no pickle)."""
    arrays = {}
    for spec in manifest.inputs:
        if spec.name not in data:
            raise ValueError(f"reference data has no array for input {spec.name!r}")
        arrays[spec.name] = np.asarray(data[spec.name], dtype=spec.numpy_dtype)
    with path.open("wb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy stubs misread **kwds


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()
