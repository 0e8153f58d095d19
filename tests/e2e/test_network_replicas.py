"""Three replicas on three hosts behind HAProxy, sharing Redis and PostgreSQL over the network
(issue 13, item 7).

Each replica is a `bastion serve` in its own network namespace (tests/netlab.py): its loopback is
its own, it reaches Redis (keys, revocations, quotas) and PostgreSQL (one audit chain for all) through
its veth and the bridge, as a host reaches managed services. HAProxy (Debian's, started here) spreads
the load roundrobin and takes a replica out when its readiness check fails. Seen from the client,
through the load balancer:

- a principal with a daily quota of Q gets exactly Q answers, however the load is spread;
- a key revoked through one replica is refused by every replica within one second;
- a host killed with SIGKILL under load loses no acknowledged audit record, and the chain verifies;
- Redis stopped mid-run: 503, never an unmetered answer; service resumes when Redis returns.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest

from bastion.audit.chain import load_or_create_audit_key
from bastion.demo import build_demo, infer_request
from tests.helpers import UNTHROTTLED_FAILED_AUTH, create_key, drop_postgres_table, postgres_table, run_cli
from tests.netlab import Lab, free_port, network_lab

pytestmark = pytest.mark.slow

REPLICAS = 3
LOAD_CLIENTS = 6
RESUME_GRACE = 1.5  # seconds after HAProxy has every replica back, with Redis, until all answers are 200
QUOTA = 90
INFER = "/v2/models/breast-cancer/infer"

# A daily quota shared by every replica; limits per second far above what the tests send.
NET_ROLES = f"""
[roles.loader]
rate = 100000
burst = 100000
daily_quota = 100000000
grants = [ {{ models = ["breast-cancer"], actions = ["infer"] }} ]
[roles.netquota]
rate = 100000
burst = 100000
daily_quota = {QUOTA}
grants = [ {{ models = ["breast-cancer"], actions = ["infer"] }} ]
"""


def deployment(demo_config: str) -> str:
    """The demo's policy file with its ONNX breast-cancer model alone (each replica loads less: three
    start at once on two cores) and the roles above; checkpoints every 25 records."""
    head = demo_config[: demo_config.index("# Analysts may ask")]
    first = head.index("[[models]]")
    head = head[: head.index("[[models]]", first + 1)]
    head = head.replace("checkpoint_every_records = 1000", "checkpoint_every_records = 25")
    # Revoked-key probes come from one address: no failed-authentication throttling in the way.
    return head.replace("[limits]\n", "[limits]\n" + UNTHROTTLED_FAILED_AUTH, 1) + NET_ROLES


@dataclass
class Cluster:
    lab: Lab
    configs: list[Path]
    lb: str  # HAProxy's URL
    lb_port: int
    table: str
    keys: dict[str, str]
    rows: np.ndarray
    killed: set[int] = field(default_factory=set)

    def body(self, i: int) -> bytes:
        """A real row of the data set (row i, cycling): traffic query auditing reads as benign."""
        j = i % len(self.rows)
        return json.dumps(infer_request(self.rows[j : j + 1])).encode()

    def restore(self) -> None:
        """Redis running, every replica up and in HAProxy's rotation (a test that killed one, or
        failed with Redis stopped, leaves it so)."""
        if self.lab.redis_process is None or self.lab.redis_process.poll() is not None:
            self.lab.start_redis()
        for index in sorted(self.killed):
            self.lab.start_replica(index, self.configs[index])
        self.killed.clear()
        self.lab.wait_backends(self.lb_port, up=REPLICAS)


def _post(client: httpx.Client, url: str, key: str, body: bytes) -> httpx.Response:
    return client.post(
        url, content=body, headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("netlab") / "deployment"
    table = postgres_table()
    with network_lab(REPLICAS, root.with_name("lab")) as lab:
        lab.start_redis()
        # HAProxy first: it also forwards the bridge's PostgreSQL port to 127.0.0.1:5432, and a replica
        # writes its model-load records before it is ready. Replicas join the rotation once ready.
        lb_port, pg_port = free_port(), free_port(lab.host_ip)
        lab.start_haproxy([f"{a}:8000" for a in lab.addresses], port=lb_port, postgres_port=pg_port)
        build = build_demo(root, llm=False)
        state = f'backend = "redis"\nredis_url = "{lab.redis_url}"\nredis_prefix = "bastion-net-{lab.tag}:"'
        audit = (
            f'sink = "postgres"\npostgres_dsn = "postgresql://postgres@{lab.host_ip}:{pg_port}/postgres"\n'
            f'postgres_table = "{table}"\nsigning_key = "audit-key/audit_signing.key"\n'
        )
        text = deployment(build.config_path.read_text()).replace('backend = "sqlite"', state)
        text = text.replace("[audit]\n", "[audit]\n" + audit, 1)
        configs = []
        for i in range(REPLICAS):
            path = root / f"replica-{i + 1}.toml"
            path.write_text(text.replace('state_dir = "state"', f'state_dir = "state-{i + 1}"'))
            configs.append(path)
        # In Redis: every replica knows them. The load comes from six clients, a key each.
        roles = {"quota": "netquota", "revoke": "loader", "fresh": "loader"}
        roles |= {f"load{t}": "loader" for t in range(LOAD_CLIENTS)}
        with ThreadPoolExecutor(4) as pool:
            keys = dict(
                zip(roles, pool.map(lambda role: create_key(configs[0], role), roles.values()), strict=True)
            )
        # Each replica its own state directory; the audit signing key one file for all, provisioned
        # beforehand (a secret mounted on every host).
        load_or_create_audit_key(root / "audit-key" / "audit_signing.key")
        with ThreadPoolExecutor(REPLICAS) as pool:  # ~4 s each to load the model: in parallel
            list(pool.map(lab.start_replica, range(REPLICAS), configs))
        lab.wait_backends(lb_port, up=REPLICAS)
        try:
            yield Cluster(lab, configs, f"http://127.0.0.1:{lb_port}", lb_port, table, keys, build.features)
        finally:
            lab.teardown()  # the replicas first: nothing writes to the table while it goes
            for suffix in ("", "_checkpoints", "_signer"):
                drop_postgres_table(table + suffix)


def _records(config: Path) -> list[dict[str, object]]:
    """The audit chain's records, as `bastion audit export` gives them (one chain for every replica)."""
    return [json.loads(line) for line in run_cli("audit", "export", "--config", config).stdout.splitlines()]


def _load(
    cluster: Cluster,
    *,
    threads: int,
    until: Callable[[], bool],
    log: list[tuple[float, int, str, str]],
) -> list[threading.Thread]:
    """Clients (threads, a key each) that post through HAProxy until `until()`; each answer appended
    to `log` as (time, status, request id, error code). A transport failure is status 0."""

    def run(offset: int) -> None:
        with httpx.Client(base_url=cluster.lb, timeout=10) as client:
            i = offset
            while not until():
                try:
                    r = _post(client, INFER, cluster.keys[f"load{offset}"], cluster.body(i))
                    code = "" if r.status_code == 200 else _code(r)
                    log.append((time.monotonic(), r.status_code, r.headers.get("x-request-id", ""), code))
                except httpx.HTTPError as e:
                    log.append((time.monotonic(), 0, "", type(e).__name__))
                i += threads

    workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    return workers


def _code(r: httpx.Response) -> str:
    try:
        return str(r.json().get("code", ""))
    except ValueError:  # HAProxy's own pages are HTML
        return f"html:{r.status_code}"


def test_a_quota_is_spent_exactly_once_across_three_hosts(cluster: Cluster) -> None:
    cluster.restore()
    key = cluster.keys["quota"]
    extra = 45

    def one(i: int) -> tuple[int, str]:
        with httpx.Client(base_url=cluster.lb, timeout=10) as c:
            r = _post(c, INFER, key, cluster.body(i))
        return r.status_code, "" if r.status_code == 200 else _code(r)

    before = cluster.lab.haproxy_stats(cluster.lb_port)
    with ThreadPoolExecutor(12) as pool:  # 12 concurrent clients, spread roundrobin over 3 replicas
        answers = list(pool.map(one, range(QUOTA + extra)))
    assert sum(status == 200 for status, _ in answers) == QUOTA
    assert sorted(set(answers) - {(200, "")}) == [(429, "quota_exhausted")]
    # The load was spread: every replica answered part of it (HAProxy's counters), and the chain
    # holds exactly Q answers to this principal.
    after = cluster.lab.haproxy_stats(cluster.lb_port)
    answered = [int(after[r]["hrsp_2xx"]) - int(before[r]["hrsp_2xx"]) for r in sorted(after)]
    assert len(answered) == REPLICAS and all(n > QUOTA // (2 * REPLICAS) for n in answered), answered
    principal = "key:" + key.split("_")[1]
    records = _records(cluster.configs[0])
    assert sum(r.get("principal") == principal and r.get("status") == 200 for r in records) == QUOTA


def test_a_key_revoked_through_one_replica_is_refused_by_all_within_one_second(cluster: Cluster) -> None:
    cluster.restore()
    key = cluster.keys["revoke"]
    with httpx.Client(timeout=5) as c:
        for index in range(REPLICAS):  # each replica knows (and caches) the key as valid
            assert (
                _post(c, cluster.lab.replica_url(index) + INFER, key, cluster.body(index)).status_code == 200
            )
    # Through replica 1: the CLI on that host, with that replica's configuration.
    revoke = [sys.executable, "-m", "bastion.cli", "keys", "revoke", "--config", str(cluster.configs[0])]
    done = subprocess.run(
        ["ip", "netns", "exec", cluster.lab.namespaces[0], *revoke, key.split("_")[1]],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    revoked_at = time.monotonic()
    refused_after: dict[int, float] = {}
    with httpx.Client(timeout=5) as c:
        while len(refused_after) < REPLICAS and time.monotonic() - revoked_at < 3:
            for index in set(range(REPLICAS)) - set(refused_after):
                r = _post(c, cluster.lab.replica_url(index) + INFER, key, cluster.body(index))
                if r.status_code == 401:
                    refused_after[index] = time.monotonic() - revoked_at
                else:
                    assert r.status_code == 200
            time.sleep(0.02)
        assert sorted(refused_after) == list(range(REPLICAS)), f"still accepted by some: {refused_after}"
        assert max(refused_after.values()) <= 1.0, refused_after
        # And through the load balancer, whichever replica answers.
        assert {_post(c, cluster.lb + INFER, key, cluster.body(i)).status_code for i in range(6)} == {401}


def test_redis_stopped_mid_run_fails_closed_and_service_resumes(cluster: Cluster) -> None:
    cluster.restore()
    log: list[tuple[float, int, str, str]] = []
    done = threading.Event()
    clients = 4
    workers = _load(cluster, threads=clients, until=done.is_set, log=log)
    try:
        time.sleep(0.8)
        assert any(status == 200 for _, status, _, _ in log), "no answers before Redis stopped"
        cluster.lab.stop_redis()
        stopped = time.monotonic()
        with httpx.Client(timeout=5) as c:
            for index in range(REPLICAS):
                base = cluster.lab.replica_url(index)
                # A key with nothing leased yet cannot be metered: refused, not answered.
                r = _post(c, base + INFER, cluster.keys["fresh"], cluster.body(index))
                assert r.status_code == 503 and r.json()["code"] == "state_unavailable"
                ready = c.get(base + "/v2/health/ready")
                assert ready.status_code == 503 and ready.json() == {"ready": False}
            cluster.lab.wait_backends(cluster.lb_port, up=0, timeout=5)  # HAProxy took them all out
            all_down = time.monotonic()
            r = _post(c, cluster.lb + INFER, cluster.keys["fresh"], cluster.body(0))
            assert r.status_code == 503
        time.sleep(1.0)
        outage_end = time.monotonic()
        cluster.lab.start_redis()
        cluster.lab.wait_backends(cluster.lb_port, up=REPLICAS, timeout=10)
        resumed = time.monotonic()
        time.sleep(RESUME_GRACE + 1.0)
    finally:
        done.set()
        for w in workers:
            w.join(timeout=15)
    during = [(t, s, c) for t, s, _, c in log if stopped <= t <= outage_end]
    # Fail closed: nothing but 503 while Redis is gone, except what the replicas had leased (and
    # metered) from it before it stopped: at most two blocks of 64 answers per principal and replica.
    assert {s for _, s, _ in during} <= {200, 503}, sorted({(s, c) for _, s, c in during})
    assert sum(s == 200 for _, s, _ in during) <= clients * REPLICAS * 2 * 64
    assert any(s == 503 for _, s, _ in during)
    late = [s for t, s, _ in during if t >= all_down + 0.3]  # what the replicas had in flight is back
    timeline = [(round(t - stopped, 2), s, c) for t, s, _, c in log if t > stopped - 0.2][:60]
    assert late and set(late) == {503}, (round(outage_end - stopped, 2), timeline)
    # Readiness comes back with Redis (HAProxy has all three back); the shared records' reads may
    # refuse a moment more (after a failure a replica does not ask again for 1 s): from then on,
    # every answer is a 200.
    after = [s for t, s, _, _ in log if t > resumed + RESUME_GRACE]
    timeline = [(round(t - resumed, 2), s, c) for t, s, _, c in log if t > resumed and s != 200]
    assert after and set(after) == {200}, (len(after), timeline)
    with httpx.Client(timeout=5) as c:
        assert _post(c, cluster.lb + INFER, cluster.keys["fresh"], cluster.body(1)).status_code == 200


def test_a_host_killed_under_load_loses_no_acknowledged_audit_record(cluster: Cluster) -> None:
    cluster.restore()
    log: list[tuple[float, int, str, str]] = []
    done = threading.Event()
    workers = _load(cluster, threads=6, until=done.is_set, log=log)
    victim = 2
    try:
        time.sleep(1.5)
        cluster.lab.kill_host(victim)  # no shutdown, no final checkpoint, no flush
        cluster.killed.add(victim)
        killed = time.monotonic()
        cluster.lab.wait_backends(cluster.lb_port, up=REPLICAS - 1, timeout=5)
        time.sleep(1.0)
    finally:
        done.set()
        for w in workers:
            w.join(timeout=15)
    acknowledged = [rid for _, status, rid, _ in log if status == 200]
    assert len(acknowledged) > 50
    assert any(status == 200 and t > killed + 0.5 for t, status, _, _ in log), "service did not continue"
    # Requests in flight on the dead host get HAProxy's 502/503/504; none is answered 200 unrecorded.
    failures = [(status, code) for _, status, _, code in log if status != 200]
    assert {status for status, _ in failures} <= {0, 502, 503, 504}, failures
    recorded = {record.get("request_id") for record in _records(cluster.configs[0])}
    missing = [rid for rid in acknowledged if rid not in recorded]
    assert not missing, f"{len(missing)} of {len(acknowledged)} acknowledged requests have no audit record"
    # The dead writer's last transaction was rolled back whole: the chain is gapless and verifies.
    result = run_cli("audit", "verify", "--config", cluster.configs[0], check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"OK: postgresql table {cluster.table}: ")


def test_without_the_privileges_for_namespaces_the_lab_fails_naming_the_reason(tmp_path: Path) -> None:
    """No skip where `ip netns` is not permitted: the test fails, and says why. Run here as root with
    every capability dropped (setpriv), which is what an unprivileged CI container looks like."""
    script = (
        "import sys\nfrom pathlib import Path\nfrom tests.netlab import network_lab\n"
        "with network_lab(1, Path(sys.argv[1])):\n    pass\n"
    )
    done = subprocess.run(
        [
            "setpriv",
            "--bounding-set=-all",
            "--inh-caps=-all",
            sys.executable,
            "-c",
            script,
            str(tmp_path / "lab"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode != 0
    assert "NetlabError" in done.stderr and "Operation not permitted" in done.stderr, done.stderr
    assert "needs root" in done.stderr
