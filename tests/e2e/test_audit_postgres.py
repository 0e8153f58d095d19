"""The audit chain in PostgreSQL, from outside: two real servers (their own state directories) write
one chain under concurrent requests and `bastion audit verify` passes with one record per answered
request; a PostgreSQL that goes away makes a server refuse (503 `audit_unavailable`) and say it is
not ready while staying live, and it serves again when the database returns."""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest

from bastion.demo import infer_request
from tests.helpers import (
    POSTGRES_DSN,
    RunningServer,
    create_key,
    drop_postgres_table,
    postgres_table,
    run_cli,
    start_server,
    write_test_deployment,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def table() -> Iterator[str]:
    name = postgres_table()
    yield name
    for suffix in ("", "_checkpoints", "_signer"):
        drop_postgres_table(name + suffix)


def _postgres_audit(dsn: str, table: str) -> str:
    return (
        f'sink = "postgres"\npostgres_dsn = "{dsn}"\npostgres_table = "{table}"\n'
        'signing_key = "audit-key/audit_signing.key"\n'
    )


def _with_audit(config: Path, audit: str) -> str:
    text = config.read_text().replace("[audit]\n", "[audit]\n" + audit, 1)
    config.write_text(text)
    return text


def _export(config: Path) -> list[dict[str, object]]:
    out = run_cli("audit", "export", "--config", config).stdout
    return [json.loads(line) for line in out.splitlines()]


def test_two_servers_write_one_postgres_chain(tmp_path: Path, table: str) -> None:
    config, build = write_test_deployment(tmp_path)
    text = _with_audit(config, _postgres_audit(POSTGRES_DSN, table))
    key = create_key(config, "loader")
    # The second replica: its own state directory (keys copied, as a replica would share them), the
    # same audit signing key file (mounted from a secret on every replica).
    shutil.copytree(tmp_path / "state", tmp_path / "state-2")
    config_2 = tmp_path / "bastion-2.toml"
    config_2.write_text(text.replace('state_dir = "state"', 'state_dir = "state-2"'))
    servers = [start_server(config, tmp_path / "a.log"), start_server(config_2, tmp_path / "b.log")]
    answered: dict[str, int] = {}  # request id: the server that answered it
    lock = threading.Lock()

    def load(n: int, server: RunningServer) -> None:
        with httpx.Client(
            base_url=server.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30
        ) as c:
            for i in range(30):
                r = c.post("/v2/models/breast-cancer/infer", json=infer_request(build.features[i : i + 1]))
                assert r.status_code == 200, r.text
                with lock:
                    answered[r.headers["x-request-id"]] = n

    try:
        with ThreadPoolExecutor(6) as pool:  # three clients on each server at once
            for f in [pool.submit(load, n, s) for n, s in enumerate(servers) for _ in range(3)]:
                f.result()
    finally:
        for server in servers:
            server.stop()
    assert len(answered) == 180

    verify = run_cli("audit", "verify", "--config", config, check=False)
    assert verify.returncode == 0, verify.stderr
    assert verify.stdout.startswith(f"OK: postgresql table {table}: ")
    records = _export(config)
    requests = [r for r in records if r.get("request_id")]
    assert sorted(str(r["request_id"]) for r in requests) == sorted(answered)  # one each, none extra
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    assert f"{len(records)} records" in verify.stdout
    # Both servers' records are in one chain, interleaved: not two chains one after the other.
    order = [answered[str(r["request_id"])] for r in requests]
    assert sum(a != b for a, b in itertools.pairwise(order)) >= 4
    # An insider turns one answer into a refusal in the table: verify names the record, exit 1.
    with psycopg.connect(POSTGRES_DSN) as conn:
        conn.execute(
            f"""UPDATE {table} SET body = replace(body, '"status":200', '"status":403') WHERE seq = 40"""
        )
    verify = run_cli("audit", "verify", "--config", config_2, check=False)
    assert verify.returncode == 1
    assert f"FAILED: postgresql table {table}: record 40: edited" in verify.stderr


class _Proxy:
    """A TCP relay to PostgreSQL that the test can cut (every connection closed, the port refused)
    and restore on the same port: PostgreSQL going away and coming back, for this server alone."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(OSError):  # wakes the thread blocked in accept (Linux)
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        self._sockets = []


def _ready(server: RunningServer) -> int:
    return httpx.get(f"{server.base_url}/v2/health/ready", timeout=10).status_code


def _refused_while_down(server: RunningServer, c: httpx.Client, body: dict[str, object]) -> None:
    # Fail closed: no answer leaves without its record committed in PostgreSQL.
    for _ in range(3):
        r = c.post("/v2/models/breast-cancer/infer", json=body)
        assert r.status_code == 503 and r.json()["code"] == "audit_unavailable"
        assert "label" not in r.text
    assert _ready(server) == 503
    assert httpx.get(f"{server.base_url}/v2/health/live").status_code == 200


def _ready_again(server: RunningServer) -> None:
    deadline = time.monotonic() + 15
    while _ready(server) != 200:
        assert time.monotonic() < deadline, "not ready again 15 s after PostgreSQL returned"
        time.sleep(0.2)


def test_postgres_outage_fails_closed_and_service_resumes(tmp_path: Path, table: str) -> None:
    target = urlsplit(POSTGRES_DSN)
    proxy = _Proxy((target.hostname or "127.0.0.1", target.port or 5432))
    dsn = POSTGRES_DSN.replace(f"{target.hostname}:{target.port or 5432}", f"127.0.0.1:{proxy.port}")
    config, build = write_test_deployment(tmp_path)
    _with_audit(config, _postgres_audit(dsn, table))
    key = create_key(config, "loader")
    # PostgreSQL is down when the server starts: it starts (live), not ready, and refuses.
    server = start_server(config, tmp_path / "server.log")
    body = infer_request(build.features[:1])
    try:
        with server.client(key) as c:
            _refused_while_down(server, c, body)
            proxy.start()
            _ready_again(server)
            assert c.post("/v2/models/breast-cancer/infer", json=body).status_code == 200
            # PostgreSQL goes away under a running server (every connection cut, the port refused).
            proxy.cut()
            _refused_while_down(server, c, body)
            proxy.start()
            _ready_again(server)
            assert c.post("/v2/models/breast-cancer/infer", json=body).status_code == 200
        server.stop()
        log = (tmp_path / "server.log").read_text()
        assert "Traceback" not in log and "audit log: a commit to postgresql table" in log
        verify = run_cli("audit", "verify", "--config", config, check=False)
        assert verify.returncode == 0, verify.stderr
        records = _export(config)
        assert [r.get("status") for r in records if r.get("route") == "infer"] == [200, 200]  # no 503 record
        assert any(r.get("route") == "model_load" for r in records)  # written once PostgreSQL answered
        proxy.cut()
        # PostgreSQL unreachable: verify cannot vouch for the chain, and says so (exit 1, no traceback).
        verify = run_cli("audit", "verify", "--config", config, check=False)
        assert verify.returncode == 1 and "cannot read" in verify.stderr and "Traceback" not in verify.stderr
    finally:
        server.stop()
        proxy.cut()
