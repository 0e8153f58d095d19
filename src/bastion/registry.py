"""The set of models this server answers for, verified and loaded at start-up.

Each configured model must be a signed bundle (see `bastion.bundle.verify`), unless
the config marks it `unsafe_unsigned`. A model that fails is refused alone: the
others keep serving, readiness reports the failure, and the reason is logged and
kept as a load event for the audit log.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bastion.breaker import BreakerPolicy
from bastion.bundle.crypto import LocalKeyProvider
from bastion.bundle.verify import BundleRefused, TrustPolicy, is_bundle, verify_bundle
from bastion.config import ModelRef
from bastion.containment import ContainmentPolicy
from bastion.errors import ErrorCode, ModelLoadError, NotFound
from bastion.extraction import ExtractionMonitor
from bastion.manifest import MANIFEST_NAME, Manifest, read_manifest
from bastion.ood import DistributionScreen, input_rows
from bastion.runtimes import ModelRuntime, load_runtime
from bastion.runtimes.teachers import TeacherEnsemble

log = logging.getLogger("bastion.registry")


@dataclass(frozen=True, slots=True)
class ServedModel:
    manifest: Manifest
    runtime: ModelRuntime
    digest: str  # the bundle's content address (or, unsafe plain directory, manifest + model file)
    teachers: TeacherEnsemble | None = None  # for private prediction
    aggregates: bool = False  # the config offers DP aggregate statistics for this model
    reference: dict[str, np.ndarray] | None = None  # the bundle's reference dataset, for aggregates
    screen: DistributionScreen | None = None  # out-of-distribution screening against the reference
    monitor: ExtractionMonitor | None = None  # query auditing: extraction detection per principal
    extraction_watch: str = "off"  # what a suspicion does: quarantine | alert | off
    isolate_after: int = 0  # flagged principals within isolation_window that isolate the model (0: never)
    isolation_window: float = 3600.0
    containment: ContainmentPolicy = field(default_factory=ContainmentPolicy)  # the ladder climbed on each incident
    breaker: BreakerPolicy = field(default_factory=BreakerPolicy)  # its deadline, threads and circuit breaker

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version


@dataclass(frozen=True, slots=True)
class LoadEvent:
    """What happened to one configured model at start-up, for the audit log."""

    path: str
    decision: str  # "allow" | "deny"
    reason: str
    detail: str
    name: str | None = None
    version: str | None = None
    digest: str | None = None


def artifact_digest(model_dir: Path, manifest: Manifest) -> str:
    h = hashlib.sha256()
    for name in (MANIFEST_NAME, manifest.file):
        h.update(name.encode() + b"\0")
        with (model_dir / name).open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


def trust_policy(ref: ModelRef) -> TrustPolicy:
    kek = None
    if ref.decryption_key is not None:
        try:
            kek = LocalKeyProvider.from_spec(ref.decryption_key)
        except ValueError as e:
            raise BundleRefused(f"{ref.path}: decryption_key: {e}", reason="decryption_failed") from None
    return TrustPolicy(
        trusted_keys=list(ref.trusted_keys),
        allow_env_drift=frozenset(ref.allow_env_drift),
        unsafe_trust_pickle=ref.unsafe_trust_pickle,
        unsafe_unsigned=ref.unsafe_unsigned,
        kek=kek,
    )


class ModelRegistry:
    def __init__(self) -> None:
        self._models: dict[str, dict[str, ServedModel]] = {}
        self.failures: dict[str, str] = {}  # model path -> reason it is not served
        self.refused_names: set[str] = set()  # names of refused models, where their manifest could be read
        self.events: list[LoadEvent] = []

    @classmethod
    def load(cls, refs: list[ModelRef]) -> ModelRegistry:
        registry = cls()
        for ref in refs:
            try:
                model = registry.add(ref)
            except ModelLoadError as e:
                reason = e.reason if isinstance(e, BundleRefused) else "model_refused"
                registry.failures[str(ref.path)] = str(e)
                with contextlib.suppress(ModelLoadError):  # no readable manifest: no name to keep
                    registry.refused_names.add(read_manifest(ref.path).name)
                registry.events.append(LoadEvent(str(ref.path), "deny", reason, str(e)))
                log.error("model refused: %s", e)
            else:
                registry.events.append(
                    LoadEvent(str(ref.path), "allow", "verified", "", model.name, model.version, model.digest)
                )
        return registry

    def add(self, ref: ModelRef) -> ServedModel:
        teachers = reference = None
        if is_bundle(ref.path):
            verified = verify_bundle(ref.path, trust_policy(ref))
            manifest, runtime, digest = verified.manifest, verified.runtime, verified.digest
            teachers, reference = verified.teachers, verified.reference
        elif ref.unsafe_unsigned:
            log.warning(
                "UNSAFE: %s is a plain model directory, served unsigned (unsafe_unsigned = true)", ref.path
            )
            manifest = read_manifest(ref.path)
            runtime = load_runtime(ref.path, manifest, unsafe_trust_pickle=ref.unsafe_trust_pickle)
            digest = artifact_digest(ref.path, manifest)
        else:
            raise BundleRefused(
                f"{ref.path}: not a signed bundle (no bundle.json). Build one with `bastion pack` and "
                "`bastion sign`, or set unsafe_unsigned = true for this model.",
                reason="not_a_bundle",
            )
        if manifest.version in self._models.get(manifest.name, {}):
            raise ModelLoadError(f"{ref.path}: {manifest.name} version {manifest.version} is already served")
        if ref.inference_isolation == "inline" and not hasattr(runtime, "stoppable"):
            # Inline, a call that cannot be stopped would hold the event loop past its deadline.
            raise ModelLoadError(
                f'{ref.path}: inference_isolation = "inline" needs a runtime whose calls can be stopped '
                f'(onnx); this one is {manifest.runtime}: use "thread"'
            )
        screen = monitor = None
        if reference is None and (ref.containment is not None or ref.isolate_after):
            # Query auditing needs the bundle's reference data: without it nothing would ever climb
            # the ladder or count toward isolation, and the setting would be accepted and ignored.
            raise ModelLoadError(
                f"{ref.path}: containment and isolate_after need query auditing, which needs reference "
                "data in the bundle (bastion pack --reference-data): pack it, or remove the setting"
            )
        if "degrade" in ref.ladder and manifest.outputs.is_regression:
            # label and top_k are made for classes: a degraded principal would get 403
            # policy_not_applicable on every request, a block that says something else.
            raise ModelLoadError(
                f"{ref.path}: containment: a degrade step lowers answers to {ref.degrade_to!r}, made for "
                f"classes, and {manifest.name!r} is a regressor: use throttle or quarantine for it"
            )
        watch = ref.extraction_watch if reference is not None else "off"
        if reference is not None and (ref.out_of_distribution == "refuse" or watch != "off"):
            names = [s.name for s in manifest.inputs]
            try:
                whitening = DistributionScreen.for_inputs(reference, names)
                if watch != "off":
                    monitor = ExtractionMonitor(whitening, input_rows(reference, names))
            except (ValueError, KeyError, np.linalg.LinAlgError) as e:
                raise ModelLoadError(
                    f"{ref.path}: the reference data cannot screen inputs ({e}): pack more reference rows, "
                    'or set out_of_distribution = "off" and extraction_watch = "off" for this model'
                ) from None
            screen = whitening if ref.out_of_distribution == "refuse" else None
        model = ServedModel(
            manifest,
            runtime,
            digest,
            teachers,
            ref.aggregates,
            reference,
            screen,
            monitor,
            watch,
            ref.isolate_after if monitor is not None else 0,
            ref.isolation_window_seconds,
            ContainmentPolicy(ref.ladder, ref.throttle_rate, ref.degrade_to, ref.containment_seconds),
            BreakerPolicy(
                ref.inference_timeout_seconds,
                ref.inference_threads,
                ref.breaker_failures,
                ref.breaker_window_seconds,
                ref.breaker_open_seconds,
                ref.breaker_half_open_probes,
                ref.inference_queue,
                ref.inference_queue_seconds,
                ref.inference_queue_per_principal,
                inline=ref.inference_isolation == "inline",
            ),
        )
        self._models.setdefault(manifest.name, {})[manifest.version] = model
        log.info("serving %s version %s (%s)", model.name, model.version, model.digest)
        return model

    @property
    def names(self) -> set[str]:
        return set(self._models)

    @property
    def configured_names(self) -> set[str]:
        """Every model the config names, served or refused: what grants and rollouts may refer to."""
        return self.names | self.refused_names

    @property
    def regressors(self) -> frozenset[str]:
        return frozenset(m.name for m in self.models() if m.manifest.outputs.is_regression)

    def models(self) -> list[ServedModel]:
        return [m for versions in self._models.values() for m in versions.values()]

    def exists(self, name: str) -> bool:
        return name in self._models

    def get(self, name: str, version: str | None = None) -> ServedModel:
        versions = self._models.get(name)
        if not versions:
            raise NotFound(f"model {name!r} not found", code=ErrorCode.MODEL_NOT_FOUND)
        if version is None:
            # The newest version serves unversioned requests (numeric versions compare as numbers).
            newest = max(versions, key=lambda v: (v.isdigit(), int(v) if v.isdigit() else 0, v))
            return versions[newest]
        model = versions.get(version)
        if model is None:
            raise NotFound(f"model {name!r} has no version {version!r}", code=ErrorCode.MODEL_NOT_FOUND)
        return model
