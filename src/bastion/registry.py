"""The set of models this server answers for, loaded once at start-up.

A model that fails to load is refused alone: the others keep serving, the
readiness probe reports the failure, and the reason is logged for the operator.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from bastion.errors import ModelLoadError, NotFound
from bastion.manifest import MANIFEST_NAME, Manifest, read_manifest
from bastion.runtimes import ModelRuntime, load_runtime

log = logging.getLogger("bastion.registry")


@dataclass(frozen=True, slots=True)
class ServedModel:
    manifest: Manifest
    runtime: ModelRuntime
    digest: str  # sha256 over the manifest and the model file: which exact artifact answered

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version


def artifact_digest(model_dir: Path, manifest: Manifest) -> str:
    h = hashlib.sha256()
    for name in (MANIFEST_NAME, manifest.file):
        h.update(name.encode() + b"\0")
        with (model_dir / name).open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


class ModelRegistry:
    def __init__(self) -> None:
        self._models: dict[str, dict[str, ServedModel]] = {}
        self.failures: dict[str, str] = {}  # model dir -> reason it is not served

    @classmethod
    def load(cls, model_dirs: list[Path]) -> ModelRegistry:
        registry = cls()
        for model_dir in model_dirs:
            try:
                registry.add(model_dir)
            except ModelLoadError as e:
                registry.failures[str(model_dir)] = str(e)
                log.error("model refused: %s", e)
        return registry

    def add(self, model_dir: Path) -> ServedModel:
        manifest = read_manifest(model_dir)
        if manifest.version in self._models.get(manifest.name, {}):
            raise ModelLoadError(f"{model_dir}: {manifest.name} version {manifest.version} is already served")
        runtime = load_runtime(model_dir, manifest)
        model = ServedModel(manifest, runtime, artifact_digest(model_dir, manifest))
        self._models.setdefault(manifest.name, {})[manifest.version] = model
        log.info("serving %s version %s (%s)", model.name, model.version, model.digest)
        return model

    @property
    def names(self) -> set[str]:
        return set(self._models)

    def models(self) -> list[ServedModel]:
        return [m for versions in self._models.values() for m in versions.values()]

    def exists(self, name: str) -> bool:
        return name in self._models

    def get(self, name: str, version: str | None = None) -> ServedModel:
        versions = self._models.get(name)
        if not versions:
            raise NotFound(f"model {name!r} not found", code="model_not_found")
        if version is None:
            # The newest version serves unversioned requests (numeric versions compare as numbers).
            newest = max(versions, key=lambda v: (v.isdigit(), int(v) if v.isdigit() else 0, v))
            return versions[newest]
        model = versions.get(version)
        if model is None:
            raise NotFound(f"model {name!r} has no version {version!r}", code="model_not_found")
        return model
