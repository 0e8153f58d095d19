"""deploy/kubernetes run as the pods would run it, without a cluster: the demo's signed bundles and keys
where the volumes mount them, the init container's own script seeding two replicas' state directories
from one seed (the Secret bastion-state-seed), the real PostgreSQL as the shared backend, and two
servers started with the container's own arguments on the policy file from the ConfigMap (its paths
moved under a temporary directory), over TLS with a certificate where the Secret bastion-tls puts it.
The probes answer 200 over HTTPS; a key created as the README
says works on both replicas, so does a token minted by one of them, a revocation reaches both, and
both replicas' records are one audit chain in PostgreSQL that `bastion audit verify` accepts."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml  # type: ignore[import-untyped]

from bastion.audit.chain import load_or_create_audit_key
from bastion.demo import build_demo
from bastion.tokens import load_or_create_signing_key
from tests.helpers import (
    BASTION,
    POSTGRES_DSN,
    RunningServer,
    drop_postgres_table,
    free_port,
    postgres_table,
    run_cli,
)
from tests.pki import Authority

pytestmark = pytest.mark.slow

K8S = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
PROD_DSN = "postgresql://bastion@bastion-postgres:5432/bastion?"


@dataclass
class Pods:
    servers: list[RunningServer]
    policy: Path
    key: str
    request: dict[str, object]
    trust: ssl.SSLContext  # the CA that signed the certificate in bastion-tls

    def client(self, server: RunningServer, credential: str) -> httpx.Client:
        """Over TLS, verifying the server's certificate; request ids kept for the audit check."""

        def remember(response: httpx.Response) -> None:
            if rid := response.headers.get("x-request-id"):
                server.request_ids.append(rid)

        return httpx.Client(
            base_url=server.base_url,
            verify=self.trust,
            headers={"Authorization": f"Bearer {credential}"},
            timeout=30,
            event_hooks={"response": [remember]},
        )


def start_tls_server(config: Path, log_path: Path, trust: ssl.SSLContext, *extra: str) -> RunningServer:
    port = free_port()
    process = subprocess.Popen(
        [*BASTION, "serve", "--config", str(config), "--port", str(port), *extra],
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    server = RunningServer(f"https://127.0.0.1:{port}", config, process, log_path)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited: {log_path.read_text()}")
        try:
            if httpx.get(f"{server.base_url}/v2/health/live", verify=trust, timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.1)
    server.stop()
    raise AssertionError(f"server did not start in 90 s: {log_path.read_text()}")


def pod_spec() -> dict[str, object]:
    for doc in yaml.safe_load_all((K8S / "deployment.yaml").read_text()):
        if doc and doc["kind"] == "Deployment":
            return dict(doc["spec"]["template"]["spec"])
    raise AssertionError("no Deployment in deployment.yaml")


@pytest.fixture(scope="module")
def pods(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pods]:
    root = tmp_path_factory.mktemp("k8s-pod")
    build_demo(root / "demo", port=0, llm=False)  # bundles/ and keys/ (release.pub, kek.key)
    table = postgres_table()
    dsn = f"{POSTGRES_DSN}?passfile=/var/lib/bastion/state/pgpass&connect_timeout=5"
    policy = (K8S / "bastion.toml").read_text()
    assert policy.count(PROD_DSN) == 2  # the shared records and the audit chain
    policy = (
        policy.replace(PROD_DSN, dsn.split("?")[0] + "?")
        .replace('backend = "postgres"\n', f'backend = "postgres"\npostgres_table = "{table}"\n')
        .replace('sink = "postgres"\n', f'sink = "postgres"\npostgres_table = "{table}_audit"\n')
    )
    # The seed, made as the README says: the keys every replica shares, and the passfile.
    seed = root / "seed"
    seed.mkdir(mode=0o700)
    load_or_create_signing_key(seed / "token_signing.jwk")
    load_or_create_audit_key(seed / "audit_signing.key")
    # The Secret bastion-tls (kubernetes.io/tls): tls.crt and tls.key, from a CA the client trusts.
    authority = Authority(root / "pki", "k8s")
    issued = authority.issue("server", cn="bastion", server=True)
    (root / "tls").mkdir()
    shutil.copy(issued.cert, root / "tls" / "tls.crt")
    shutil.copy(issued.key, root / "tls" / "tls.key")
    trust = ssl.create_default_context(cafile=str(authority.pem))
    (seed / "payload_hmac.key").write_bytes(secrets.token_bytes(32))
    (seed / "pgpass").write_text("*:*:*:*:unused-with-trust-auth\n")
    spec = pod_spec()
    init = spec["initContainers"][0]  # type: ignore[index]
    main = spec["containers"][0]  # type: ignore[index]
    policies = []
    for replica in ("0", "1"):
        var = root / f"var-lib-bastion-{replica}"  # the pod's emptyDir
        var.mkdir()
        moved = (
            policy.replace("/var/lib/bastion/", f"{var}/")
            .replace('"/models/', f'"{root}/demo/bundles/')
            .replace("/etc/bastion/model-keys/", f"{root}/demo/keys/")
            .replace("/etc/bastion/tls/", f"{root}/tls/")
        )
        path = root / f"bastion-{replica}.toml"
        path.write_text(moved)
        policies.append(path)
        # The init container's own script, its two mount paths moved.
        script = (
            init["command"][-1]
            .replace("/var/lib/bastion", str(var))
            .replace("/etc/bastion/state-seed", str(seed))
        )
        subprocess.run(["/bin/sh", "-ec", script], check=True, timeout=30)
        state = var / "state"
        assert state.stat().st_mode & 0o777 == 0o700
        assert all(f.stat().st_mode & 0o777 == 0o600 for f in state.iterdir())
    # `kubectl exec deploy/bastion -- bastion keys create ...`: the key lands in PostgreSQL.
    key = run_cli(
        "keys", "create", "--config", policies[0], "--name", "ci", "--role", "analyst"
    ).stdout.strip()
    args = main["args"]
    extra = [
        *args[args.index("--config") + 2 :],
        "--host",
        "127.0.0.1",
    ]  # the container's flags (--workers 2)
    assert "--workers" in extra
    servers = []
    try:
        for i, path in enumerate(policies):
            flags = extra if i == 0 else ["--host", "127.0.0.1"]
            servers.append(start_tls_server(path, root / f"server-{i}.log", trust, *flags))
        request = {"inputs": [_request_input(root / "demo" / "request.json")]}
        yield Pods(servers, policies[0], key, request, trust)
    finally:
        for server in servers:
            server.stop()
        drop_postgres_table(table)


def _request_input(path: Path) -> dict[str, object]:
    doc = json.loads(path.read_text())
    return dict(doc["inputs"][0])


def test_the_readiness_and_liveness_probes_answer(pods: Pods) -> None:
    probes = pod_spec()["containers"][0]  # type: ignore[index]
    for server in pods.servers:
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            get = probes[probe]["httpGet"]
            assert get["scheme"] == "HTTPS"
            # The kubelet does not verify the certificate; this client does, and so would any other.
            r = httpx.get(server.base_url + get["path"], verify=pods.trust, timeout=5)
            assert r.status_code == 200, (probe, r.text)
        # Plain HTTP to the TLS port gets no answer.
        with pytest.raises(httpx.HTTPError):
            httpx.get(server.base_url.replace("https://", "http://") + "/v2/health/live", timeout=3)


def test_a_key_and_a_token_work_on_every_replica(pods: Pods) -> None:
    for server in pods.servers:
        with pods.client(server, pods.key) as c:
            r = c.post("/v2/models/breast-cancer/infer", json=pods.request)
        assert r.status_code == 200, r.text
        assert [o["name"] for o in r.json()["outputs"]] == ["label"]  # the analyst's grant
    with pods.client(pods.servers[0], pods.key) as c:
        token = c.post("/v2/auth/token", json={}).json()["access_token"]
    # Minted by replica 0, accepted by replica 1: both were seeded with the same token-signing key.
    with pods.client(pods.servers[1], token) as c:
        assert c.post("/v2/models/breast-cancer/infer", json=pods.request).status_code == 200


def test_a_revocation_reaches_every_replica(pods: Pods) -> None:
    key = run_cli(
        "keys", "create", "--config", pods.policy, "--name", "gone", "--role", "analyst"
    ).stdout.strip()
    for server in pods.servers:
        with pods.client(server, key) as c:
            assert c.post("/v2/models/breast-cancer/infer", json=pods.request).status_code == 200
    run_cli("keys", "revoke", "--config", pods.policy, key)
    time.sleep(1.0)  # the shared records are re-read every 0.25 s
    for server in pods.servers:
        with pods.client(server, key) as c:
            assert c.post("/v2/models/breast-cancer/infer", json=pods.request).status_code == 401


def test_both_replicas_write_one_audit_chain_that_verifies(pods: Pods) -> None:
    for server in pods.servers:
        with pods.client(server, pods.key) as c:
            assert c.post("/v2/models/breast-cancer/infer", json=pods.request).status_code == 200
    # `kubectl exec deploy/bastion -- bastion audit verify --config ...`, from either pod.
    out = run_cli("audit", "verify", "--config", pods.policy).stdout
    assert out.startswith("OK: ") and "postgres" in out.lower(), out
    records = int(out.split(": ")[2].split(" records")[0])
    exported = run_cli("audit", "export", "--config", pods.policy).stdout.splitlines()
    assert len(exported) == records
    served = {json.loads(line).get("request_id") for line in exported}
    assert set(pods.servers[0].request_ids) & served and set(pods.servers[1].request_ids) & served


def _tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (the supervisor and its workers)."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) * 1024
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            rss += _tree_rss(int(child))
    return rss


def test_a_pod_fits_in_its_memory_limit(pods: Pods) -> None:
    main = pod_spec()["containers"][0]  # type: ignore[index]
    limit = main["resources"]["limits"]["memory"]
    assert limit.endswith("Gi")
    with pods.client(pods.servers[0], pods.key) as c:  # every model has answered at least once
        for model in ("breast-cancer", "breast-cancer-skops"):
            assert c.post(f"/v2/models/{model}/infer", json=pods.request).status_code == 200
    # The replica started with the container's own flags (--workers 2): supervisor plus workers,
    # with room to spare under the limit (the OOM killer does not wait for the last byte).
    rss = _tree_rss(pods.servers[0].process.pid)
    print(f"replica with the container's flags: {rss / 2**20:.0f} MiB resident, limit {limit}")
    assert rss < 0.75 * int(limit.removesuffix("Gi")) * 2**30
