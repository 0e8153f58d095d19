"""`bastion serve --workers 2`, real processes: the port is shared by both workers, a worker killed
under load is restarted while the service keeps answering, a quota holds exactly across workers,
every acknowledged request is in the audit chain and the chain verifies, SIGTERM stops them all,
and a state backend that cannot be shared is refused at start-up.

Which worker answered is read from the kernel (/proc: the supervisor's children and the sockets
each holds), not from anything the server tells a client."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest

from bastion.demo import infer_request
from bastion.grpc import grpc_predict_v2_pb2 as pb
from bastion.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub
from tests.helpers import (
    BASTION,
    RunningServer,
    create_key,
    free_port,
    run_cli,
    start_server,
    write_test_deployment,
)

pytestmark = pytest.mark.slow

QUOTA = 40
ROLES = f"""
[roles.quota40]
rate = 1000
burst = 1000
daily_quota = {QUOTA}
grants = [ {{ models = ["breast-cancer"], actions = ["infer"] }} ]

"""


def children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def sockets_on_port(pid: int, port: int, state: str) -> int:
    """Sockets `pid` holds whose local port is `port` in TCP state `state` ('0A' listen, '01' established)."""
    mine = _socket_inodes(pid)
    count = 0
    lines = (
        Path("/proc/net/tcp").read_text().splitlines()[1:]
        + Path("/proc/net/tcp6").read_text().splitlines()[1:]
    )
    for line in lines:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == state and fields[9] in mine:
            count += 1
    return count


def wait_for_workers(
    server: RunningServer, port: int, count: int, timeout: float = 60, *, gone: int = 0
) -> list[int]:
    """The supervisor's workers once `count` of them (and not `gone`) listen on the port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listening = [p for p in children(server.process.pid) if p != gone and sockets_on_port(p, port, "0A")]
        if len(listening) == count:
            return listening
        time.sleep(0.2)
    raise AssertionError(f"{count} workers not listening on {port} within {timeout} s")


@dataclass
class Deployment:
    server: RunningServer
    config: Path
    root: Path
    port: int
    grpc_port: int
    key: str
    quota_key: str
    features: np.ndarray


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("workers")
    grpc_port = free_port()
    config, build = write_test_deployment(
        root, extra=f"[grpc]\nenabled = true\nport = {grpc_port}\n\n" + ROLES
    )
    key, quota_key = create_key(config, "analyst"), create_key(config, "quota40")
    server = start_server(config, root / "server.log", "--workers", "2")
    port = int(server.base_url.rsplit(":", 1)[1])
    wait_for_workers(server, port, 2)
    yield Deployment(server, config, root, port, grpc_port, key, quota_key, build.features)
    server.stop()


def _infer(dep: Deployment, key: str, i: int) -> int:
    # A new connection per request: the kernel picks a worker per connection.
    body = infer_request(dep.features[i % len(dep.features)][None, :])
    try:
        r = httpx.post(
            f"{dep.server.base_url}/v2/models/breast-cancer/infer",
            json=body,
            headers={"Authorization": f"Bearer {key}"},
            timeout=10,
        )
    except httpx.TransportError:
        return 0
    return r.status_code


def test_requests_land_on_both_workers(deployment: Deployment) -> None:
    dep = deployment
    workers = wait_for_workers(dep.server, dep.port, 2)
    body = infer_request(dep.features[:1])
    clients = [
        httpx.Client(base_url=dep.server.base_url, headers={"Authorization": f"Bearer {dep.key}"})
        for _ in range(16)
    ]
    try:
        for c in clients:  # each keeps its connection open (keep-alive) while we look
            assert c.post("/v2/models/breast-cancer/infer", json=body).status_code == 200
        held = {pid: sockets_on_port(pid, dep.port, "01") for pid in workers}
    finally:
        for c in clients:
            c.close()
    assert sum(held.values()) == 16, held
    assert all(n >= 2 for n in held.values()), f"connections per worker: {held}"


def test_grpc_is_served_by_every_worker(deployment: Deployment) -> None:
    dep = deployment
    workers = wait_for_workers(dep.server, dep.port, 2)
    # Both bound the gRPC port (SO_REUSEPORT), not only the first to start.
    assert all(sockets_on_port(pid, dep.grpc_port, "0A") == 1 for pid in workers)
    request = pb.ModelInferRequest(model_name="breast-cancer")
    row = dep.features[0]
    request.inputs.add(name="features", datatype="FP32", shape=[1, len(row)]).contents.fp32_contents.extend(
        row.tolist()
    )
    answered = 0
    for _ in range(6):  # a new channel each time: a new connection for the kernel to place
        with grpc.insecure_channel(f"127.0.0.1:{dep.grpc_port}") as channel:
            stub = GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
            stub.ModelInfer(request, metadata=[("authorization", f"Bearer {dep.key}")], timeout=10)
            answered += 1
    assert answered == 6


def _infer_count(dep: Deployment, admin: str) -> float:
    text = httpx.get(
        f"{dep.server.base_url}/metrics", headers={"Authorization": f"Bearer {admin}"}, timeout=10
    ).text
    assert "pid=" not in text  # no per-process series
    found = re.search(
        r'^bastion_requests_total\{decision="allow",model="breast-cancer",route="infer",status="200"\} (\S+)$',
        text,
        re.M,
    )
    return float(found.group(1)) if found else 0.0


def test_metrics_are_summed_over_workers(deployment: Deployment) -> None:
    dep = deployment
    wait_for_workers(dep.server, dep.port, 2)
    admin = create_key(dep.config, "admin")
    before = _infer_count(dep, admin)
    with ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(lambda i: _infer(dep, dep.key, i), range(20)))
    assert codes == [200] * 20
    # Each request on a new connection: both workers answered some (all 20 on one: 2 in a million).
    # Whichever worker answers the scrape, the count is the server's.
    for _ in range(4):
        assert _infer_count(dep, admin) == before + 20


def test_quota_holds_exactly_across_workers(deployment: Deployment) -> None:
    dep = deployment
    with ThreadPoolExecutor(8) as pool:
        codes = Counter(pool.map(lambda i: _infer(dep, dep.quota_key, i), range(3 * QUOTA)))
    assert codes[200] == QUOTA, codes
    assert codes[429] == 2 * QUOTA, codes


def test_sigkill_of_a_worker_under_load(deployment: Deployment) -> None:
    dep = deployment
    before = wait_for_workers(dep.server, dep.port, 2)
    results: list[tuple[float, int]] = []
    stop = threading.Event()

    def load(offset: int) -> None:
        i = offset
        while not stop.is_set():
            sent = time.monotonic()
            results.append((sent, _infer(dep, dep.key, i)))
            i += 4

    threads = [threading.Thread(target=load, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.5)
        killed_at = time.monotonic()
        os.kill(before[0], signal.SIGKILL)
        after = wait_for_workers(dep.server, dep.port, 2, timeout=60, gone=before[0])
        restarted_at = time.monotonic()
        time.sleep(1.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=20)
    assert before[1] in after  # the dead one replaced, the other untouched
    assert restarted_at - killed_at < 60  # a restart, then its models load (seconds on a busy machine)
    # By when each request was sent: one sent before the kill may have been in the dead worker.
    during = [code for ts, code in results if killed_at <= ts < restarted_at]
    late = [code for ts, code in results if ts >= restarted_at]
    # The sibling kept answering while the dead worker was replaced; only connections the dead one
    # held (in flight or in its accept queue) failed.
    assert during.count(200) > 0
    assert late and late.count(200) == len(late), Counter(late)
    assert sum(1 for _, code in results if code not in (0, 200)) == 0


def _worker_of(dep: Deployment, workers: list[int], client_port: int) -> int:
    """The worker holding the server end of the client's connection from `client_port`."""
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    inodes = {
        f[9]
        for f in (line.split() for line in lines)
        if int(f[1].split(":")[1], 16) == dep.port and int(f[2].split(":")[1], 16) == client_port
    }
    (pid,) = [p for p in workers if _socket_inodes(p) & inodes]
    return pid


def _connection_on(dep: Deployment, workers: list[int], pid: int) -> http.client.HTTPConnection:
    """A new connection that the kernel placed on worker `pid` (read from /proc after a health check)."""
    for _ in range(200):
        conn = http.client.HTTPConnection("127.0.0.1", dep.port, timeout=10)
        conn.request("GET", "/v2/health/live")
        conn.getresponse().read()
        if _worker_of(dep, workers, conn.sock.getsockname()[1]) == pid:
            return conn
        conn.close()
    raise AssertionError(f"no connection placed on worker {pid} in 200 tries")


def _probe_until_quarantined(dep: Deployment, key: str, on: list[int]) -> int:
    """Jacobian-style probing around five seeds, request i sent on a new connection placed on worker
    `on[i % len(on)]`; the number of requests until the key is quarantined."""
    rng = np.random.default_rng(0)
    x = dep.features
    seeds, spread = x[200:205], x.std(axis=0)
    workers = wait_for_workers(dep.server, dep.port, 2)
    for i in range(100):
        row = seeds[i % len(seeds)] + 0.01 * spread * np.sign(rng.standard_normal(x.shape[1]))
        conn = _connection_on(dep, workers, on[i % len(on)])
        body = json.dumps(infer_request(row[None].astype(np.float32)))
        try:
            conn.request(
                "POST",
                "/v2/models/breast-cancer/infer",
                body,
                {"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
            )
            response = conn.getresponse()
            answer = json.loads(response.read())
        finally:
            conn.close()
        if response.status == 403:
            assert answer["code"] == "key_quarantined"
            return i + 1
        assert response.status == 200, answer
    raise AssertionError("never quarantined")


def test_a_thief_spread_over_workers_is_quarantined_as_soon_as_on_one(deployment: Deployment) -> None:
    dep = deployment
    first, second = wait_for_workers(dep.server, dep.port, 2)
    alone = _probe_until_quarantined(dep, create_key(dep.config, "admin"), [first])
    spread = _probe_until_quarantined(dep, create_key(dep.config, "admin"), [first, second])
    assert alone <= 40
    assert spread == alone


def _fresh_request(
    dep: Deployment, workers: list[int], method: str, path: str, headers: dict[str, str]
) -> tuple[int, int, bytes]:
    """(worker pid, status, body) of one request on a new connection (the kernel picks the worker)."""
    conn = http.client.HTTPConnection("127.0.0.1", dep.port, timeout=10)
    try:
        conn.request(
            method, path, "{}" if method == "POST" else None, {"Content-Type": "application/json", **headers}
        )
        response = conn.getresponse()
        body = response.read()  # answered: the worker has accepted the connection, which is still open
        return _worker_of(dep, workers, conn.sock.getsockname()[1]), response.status, body
    finally:
        conn.close()


def test_a_dashboard_session_and_a_token_revocation_hold_on_every_worker(deployment: Deployment) -> None:
    """Sessions and the token deny list live in the state directory's records.db, which both workers
    read: a session opened on one is served by both, its logout is seen by both, and a token revoked
    by the CLI is refused by both within a second."""
    dep = deployment
    workers = wait_for_workers(dep.server, dep.port, 2)
    admin = create_key(dep.config, "admin")
    with dep.server.client(admin) as c:
        opened = c.post("/v2/admin/session", json={})
    assert opened.status_code == 200
    cookie = f"bastion_session={opened.cookies['bastion_session']}"
    csrf = opened.json()["csrf_token"]
    served: Counter[int] = Counter()
    for i in range(20):
        if i % 4 == 3:  # a state-changing request now and then, with the CSRF token
            method, path = "POST", f"/v2/admin/keys/{dep.key.split('_')[1]}/revoke-tokens"
        else:
            method, path = "GET", "/v2/admin/summary" if i % 2 else "/v2/admin/incidents"
        pid, status, body = _fresh_request(
            dep, workers, method, path, {"Cookie": cookie, "X-CSRF-Token": csrf}
        )
        assert status == 200, (i, method, path, body[:200])
        served[pid] += 1
    assert set(served) == set(workers), f"requests per worker: {served}"

    # Logout through one worker: within a second, neither worker takes the cookie.
    pid, status, _ = _fresh_request(
        dep, workers, "POST", "/v2/admin/session/logout", {"Cookie": cookie, "X-CSRF-Token": csrf}
    )
    assert status == 200
    refused_by: set[int] = set()
    deadline = time.monotonic() + 1.0
    while refused_by != set(workers):
        assert time.monotonic() < deadline, f"only {refused_by} refuse a session ended on {pid}"
        who, status, _ = _fresh_request(dep, workers, "GET", "/v2/admin/summary", {"Cookie": cookie})
        if status == 401:
            refused_by.add(who)
        else:
            assert status == 200

    # A token revoked by the CLI (it writes records.db beside the running workers).
    time.sleep(1.0)  # past the revoke-before above, which covers the tokens of its second
    with dep.server.client(dep.key) as c:
        issued = c.post("/v2/auth/token", json={}).json()
    bearer = {"Authorization": f"Bearer {issued['access_token']}"}
    assert _fresh_request(dep, workers, "GET", "/v2/models/breast-cancer", bearer)[1] == 200
    run_cli("tokens", "revoke", "--config", dep.config, issued["jti"])
    revoked_at = time.monotonic()
    refused_by = set()
    while refused_by != set(workers):
        assert time.monotonic() - revoked_at < 1.0, f"only {refused_by} refuse the revoked token"
        who, status, _ = _fresh_request(dep, workers, "GET", "/v2/models/breast-cancer", bearer)
        if status == 401:
            refused_by.add(who)
        else:
            assert status == 200


def test_zz_sigterm_stops_all_and_the_audit_chain_verifies(deployment: Deployment) -> None:
    dep = deployment
    workers = wait_for_workers(dep.server, dep.port, 2)
    ids = []
    with httpx.Client(base_url=dep.server.base_url, headers={"Authorization": f"Bearer {dep.key}"}) as c:
        for i in range(20):
            r = c.post("/v2/models/breast-cancer/infer", json=infer_request(dep.features[i : i + 1]))
            assert r.status_code == 200
            ids.append(r.headers["x-request-id"])
    dep.server.process.send_signal(signal.SIGTERM)
    assert dep.server.process.wait(timeout=40) == 0
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    conn = sqlite3.connect(dep.root / "state" / "audit.db")
    recorded = {json.loads(b).get("request_id") for (b,) in conn.execute("SELECT body FROM records")}
    conn.close()
    assert set(ids) <= recorded
    # Records from both workers, one chain.
    assert run_cli("audit", "verify", "--config", dep.config).returncode == 0


def test_memory_state_is_refused_with_workers(tmp_path: Path) -> None:
    config, _ = write_test_deployment(tmp_path / "d")
    config.write_text(config.read_text().replace('backend = "sqlite"', 'backend = "memory"'))
    result = subprocess.run(
        [*BASTION, "serve", "--config", str(config), "--port", str(free_port()), "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "state.backend" in result.stderr and "memory" in result.stderr
