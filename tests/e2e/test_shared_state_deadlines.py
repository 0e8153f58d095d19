"""A hung shared backend, from the attacker's side: a real server whose Redis or PostgreSQL sits behind
a TCP relay that the test freezes (the connections stay open, bytes are acknowledged and never
forwarded: a hung server, a stopped proxy), and a PostgreSQL table lock held by another session.
The server must answer 503 `state_unavailable` within about a second, keep answering liveness
within half a second, say it is not ready, and serve again once the backend answers. And
`bastion check` must fail, naming the file, the setting and host:port, when a backend is unreachable."""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest

from bastion.demo import infer_request
from bastion.errors import StateUnavailable
from bastion.query_history import PostgresHistoryStore
from bastion.records import DEADLINE, Records
from bastion.records.postgres import PostgresRecords
from bastion.records.redis import RedisRecords
from bastion.state.leased import QUOTA
from bastion.state.postgres import DEADLINE as PG_LEDGER_DEADLINE
from bastion.state.postgres import RETRY_AFTER as PG_LEDGER_RETRY_AFTER
from bastion.state.postgres import PostgresLedger
from tests.helpers import (
    POSTGRES_DSN,
    REDIS_URL,
    RunningServer,
    create_key,
    drop_postgres_table,
    drop_redis_keys,
    postgres_table,
    redis_prefix,
    run_cli,
    start_server,
    write_test_deployment,
)

pytestmark = pytest.mark.slow

INFER = "/v2/models/breast-cancer/infer"


class FreezableRelay:
    """A TCP relay that `freeze()` stops forwarding in both directions while keeping every
    connection open (the kernel still acknowledges what the server sends), and `thaw()` resumes."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.frozen = threading.Event()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = int(self._listener.getsockname()[1])
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError, ValueError):
            while True:
                if self.frozen.is_set():  # read nothing, forward nothing: the bytes wait in the kernel
                    time.sleep(0.01)
                    continue
                if not select.select([source], [], [], 0.05)[0]:
                    continue
                data = source.recv(65536)
                if not data:
                    break
                while self.frozen.is_set():
                    time.sleep(0.01)
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_RDWR)

    def freeze(self) -> None:
        self.frozen.set()

    def thaw(self) -> None:
        self.frozen.clear()

    def reset(self) -> None:
        """Cut every open connection (the listener stays): the backend restarted."""
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        self._sockets = []

    def close(self) -> None:
        self.frozen.clear()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.close()


def _relayed(url: str, relay: FreezableRelay) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.replace(f"{parts.hostname}:{parts.port}", f"127.0.0.1:{relay.port}")
    return parts._replace(netloc=netloc).geturl()


@dataclass
class Deployment:
    server: RunningServer
    key: str
    body: dict[str, object]
    relay: FreezableRelay
    config: Path


def _target(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or (6379 if parts.scheme.startswith("redis") else 5432)


@pytest.fixture(params=["redis", "postgres"])
def deployment(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Deployment]:
    url = REDIS_URL if request.param == "redis" else POSTGRES_DSN
    relay = FreezableRelay(_target(url))
    relayed = _relayed(url, relay)
    if request.param == "redis":
        namespace = redis_prefix()
        state = f'backend = "redis"\nredis_url = "{relayed}"\nredis_prefix = "{namespace}"'
    else:
        namespace = postgres_table()
        state = f'backend = "postgres"\npostgres_dsn = "{relayed}"\npostgres_table = "{namespace}"'
    config, build = write_test_deployment(tmp_path)
    config.write_text(config.read_text().replace('backend = "sqlite"', state))
    key = create_key(config, "analyst")
    server = start_server(config, tmp_path / "server.log")
    try:
        yield Deployment(server, key, infer_request(build.features[:2]), relay, config)
    finally:
        relay.thaw()
        server.stop()
        relay.close()
        if request.param == "redis":
            drop_redis_keys(namespace)
        else:
            drop_postgres_table(namespace)


class LivenessWatch:
    """Polls /v2/health/live every 20 ms on its own thread; `latencies` in seconds."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=30) as c:
            while not self._stop.is_set():
                t = time.monotonic()
                assert c.get(f"{self.base_url}/v2/health/live").status_code == 200
                self.latencies.append(time.monotonic() - t)
                time.sleep(0.02)

    def stop(self) -> list[float]:
        self._stop.set()
        self._thread.join(timeout=35)
        return self.latencies


def _ask(d: Deployment, c: httpx.Client) -> tuple[int, str, float]:
    t = time.monotonic()
    r = c.post(INFER, json=d.body)
    return r.status_code, r.json().get("code", ""), time.monotonic() - t


def _served_again(d: Deployment, c: httpx.Client, within: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < within:
        if _ask(d, c)[0] == 200:
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"not served again within {within} s of the backend answering")


def test_a_frozen_backend_gets_503_quickly_liveness_stays_fast_and_service_resumes(
    deployment: Deployment,
) -> None:
    d = deployment
    with d.server.client(d.key) as c:
        assert _ask(d, c)[0] == 200
        watch = LivenessWatch(d.server.base_url)
        time.sleep(0.2)
        d.relay.freeze()
        seen = []
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3:  # every store's counter is read within 0.25 s: the freeze shows
            seen.append(_ask(d, c))
            time.sleep(0.02)
        t = time.monotonic()
        ready = httpx.get(f"{d.server.base_url}/v2/health/ready", timeout=30)
        ready_took = time.monotonic() - t
        d.relay.thaw()
        resumed = _served_again(d, c, within=5)
        live = watch.stop()
    refused = [s for s in seen if s[0] == 503]
    assert refused, f"never a 503 while the backend was frozen: {seen}"
    assert all(code == "state_unavailable" for _, code, _ in refused)
    # No answer while frozen except what was read before the freeze showed (the first 0.25 s).
    assert all(s[0] in (200, 503) for s in seen)
    assert max(dt for _, _, dt in seen) < 1.5, seen
    assert seen[-1][0] == 503
    assert ready.status_code == 503 and ready_took < 1.5
    assert max(live) < 0.5, f"liveness took up to {max(live):.2f} s during the freeze"
    assert resumed < 3
    assert httpx.get(f"{d.server.base_url}/v2/health/ready", timeout=10).status_code == 200


def test_a_table_lock_held_by_another_session_gets_503_and_liveness_stays_fast(tmp_path: Path) -> None:
    table = postgres_table()
    state = f'backend = "postgres"\npostgres_dsn = "{POSTGRES_DSN}"\npostgres_table = "{table}"'
    config, build = write_test_deployment(tmp_path)
    config.write_text(config.read_text().replace('backend = "sqlite"', state))
    key = create_key(config, "analyst")
    server = start_server(config, tmp_path / "server.log")
    body = infer_request(build.features[:2])
    try:
        with server.client(key) as c, psycopg.connect(POSTGRES_DSN) as other:
            assert c.post(INFER, json=body).status_code == 200
            watch = LivenessWatch(server.base_url)
            other.execute(f'LOCK TABLE "{table}_records_counters" IN ACCESS EXCLUSIVE MODE')
            seen = []
            t0 = time.monotonic()
            while time.monotonic() - t0 < 3:
                t = time.monotonic()
                r = c.post(INFER, json=body)
                seen.append((r.status_code, r.json().get("code", ""), time.monotonic() - t))
                time.sleep(0.02)
            other.rollback()  # the lock is released
            t1 = time.monotonic()
            while c.post(INFER, json=body).status_code != 200:
                assert time.monotonic() - t1 < 5, "not served again after the lock was released"
                time.sleep(0.05)
            live = watch.stop()
        assert any(s == 503 and code == "state_unavailable" for s, code, _ in seen), seen
        assert max(dt for _, _, dt in seen) < 1.5, seen
        assert max(live) < 0.5, f"liveness took up to {max(live):.2f} s while the table was locked"
    finally:
        server.stop()
        drop_postgres_table(table)


@pytest.mark.parametrize(
    ("section", "setting", "line"),
    [
        ("state", "state.redis_url", 'backend = "redis"\nredis_url = "redis://:Sup3rS3cret@127.0.0.1:9/0"'),
        (
            "state",
            "state.postgres_dsn",
            'backend = "postgres"\npostgres_dsn = "postgresql://postgres:Sup3rS3cret@127.0.0.1:9/x"',
        ),
        (
            "audit",
            "audit.postgres_dsn",
            'sink = "postgres"\npostgres_dsn = "postgresql://postgres:Sup3rS3cret@127.0.0.1:9/x"',
        ),
    ],
    ids=["redis", "postgres", "audit"],
)
def test_check_fails_naming_the_file_the_setting_and_the_host(
    tmp_path: Path, section: str, setting: str, line: str
) -> None:
    config, _ = write_test_deployment(tmp_path)
    text = config.read_text()
    if section == "state":
        text = text.replace('backend = "sqlite"', line)
    else:
        text = text.replace("[audit]\n", f"[audit]\n{line}\n", 1)
    config.write_text(text)
    checked = run_cli("check", "--config", config, check=False)
    out = checked.stdout + checked.stderr
    assert checked.returncode == 1, out
    assert f"UNREACHABLE {config}: {setting} (127.0.0.1:9)" in checked.stdout, out
    assert "Sup3rS3cret" not in out and "Traceback" not in out
    if section == "state":
        # Any other command says which setting of which file did not answer (not only "unavailable").
        listed = run_cli("keys", "list", "--config", config, check=False)
        assert listed.returncode == 1
        assert f"{setting}, 127.0.0.1:9 in {config}" in listed.stderr, listed.stderr
        assert "Sup3rS3cret" not in listed.stderr + listed.stdout
        # The server starts (not ready), refuses, and its log names the setting and host:port.
        server = start_server(config, tmp_path / "server.log")
        try:
            unknown = "bst_" + "0" * 16 + "_" + "A" * 43  # well formed: looked up in the backend
            r = httpx.post(
                f"{server.base_url}{INFER}", json={}, headers={"Authorization": f"Bearer {unknown}"}, timeout=10
            )
            assert r.status_code == 503 and r.json()["code"] == "state_unavailable"
            assert "127.0.0.1:9" not in r.text  # the operator's detail stays in the log
            assert httpx.get(f"{server.base_url}/v2/health/ready", timeout=10).status_code == 503
        finally:
            server.stop()
        log = (tmp_path / "server.log").read_text()
        assert f"unavailable ({setting}, 127.0.0.1:9)" in log, log[-2000:]
        assert "Sup3rS3cret" not in log


def test_check_passes_with_reachable_backends(tmp_path: Path) -> None:
    prefix = redis_prefix()
    config, _ = write_test_deployment(tmp_path)
    text = config.read_text().replace(
        'backend = "sqlite"', f'backend = "redis"\nredis_url = "{REDIS_URL}"\nredis_prefix = "{prefix}"'
    )
    config.write_text(text)
    try:
        checked = run_cli("check", "--config", config, check=False)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert f"ok      state.redis_url {_target(REDIS_URL)[0]}:{_target(REDIS_URL)[1]} answers" in checked.stdout
    finally:
        drop_redis_keys(prefix)


@pytest.fixture(params=["redis", "postgres"])
def relayed_records(request: pytest.FixtureRequest) -> Iterator[tuple[Records, FreezableRelay]]:
    """A `Records` of the real backend, behind a relay the test can freeze or cut."""
    url = REDIS_URL if request.param == "redis" else POSTGRES_DSN
    relay = FreezableRelay(_target(url))
    records: Records
    if request.param == "redis":
        namespace = redis_prefix()
        records = RedisRecords(_relayed(url, relay), prefix=namespace)
    else:
        namespace = postgres_table()
        records = PostgresRecords(_relayed(url, relay), table=f"{namespace}_records")
    try:
        yield records, relay
    finally:
        relay.thaw()
        records.close()
        relay.close()
        if request.param == "redis":
            drop_redis_keys(namespace)
        else:
            drop_postgres_table(namespace)


def test_a_call_on_a_frozen_backend_ends_at_its_deadline_then_fails_at_once_until_it_answers(
    relayed_records: tuple[Records, FreezableRelay],
) -> None:
    records, relay = relayed_records
    assert records.swap("c", "k", None, '"v"') and records.version("c") == 1
    relay.freeze()
    t = time.monotonic()
    with pytest.raises(StateUnavailable) as refused:
        records.get("c", "k")
    assert time.monotonic() - t < DEADLINE + 0.15
    assert refused.value.source  # the setting / host:port, for the operator
    t = time.monotonic()
    for _ in range(20):  # marked down: no call waits on the network
        with pytest.raises(StateUnavailable):
            records.version("c")
    assert time.monotonic() - t < 0.05
    assert not records.reachable()
    relay.thaw()
    t = time.monotonic()
    while True:
        with contextlib.suppress(StateUnavailable):
            assert records.get("c", "k") == '"v"'
            break
        assert time.monotonic() - t < 3, "still refused 3 s after the backend answered again"
        time.sleep(0.02)


def test_a_dead_pooled_connection_after_a_restart_is_replaced_not_refused(
    relayed_records: tuple[Records, FreezableRelay],
) -> None:
    records, relay = relayed_records
    assert records.swap("c", "k", None, '"v"')
    for _ in range(3):
        relay.reset()  # every open connection cut, as when the backend restarts
        assert records.get("c", "k") == '"v"'  # no 503: a new connection, at once
        assert records.version("c") == 1


def test_the_postgres_ledger_refuses_within_its_deadline_on_a_frozen_server_and_resumes() -> None:
    """Quotas and budgets (bastion.state.postgres): asynchronous, so they never held the loop, but
    a request waited as long as the hung server (cancelling a psycopg query waits for the server)."""
    relay = FreezableRelay(_target(POSTGRES_DSN))
    table = postgres_table()

    async def scenario() -> None:
        ledger = PostgresLedger(_relayed(POSTGRES_DSN, relay), table=table)

        async def take() -> tuple[float, float]:
            return await ledger.take(QUOTA, "p", 1, limit=100, need=1, cap=8, ttl=60)

        assert await take() == (8, 92)
        relay.freeze()
        t = time.monotonic()
        with pytest.raises(StateUnavailable):
            await take()
        assert time.monotonic() - t < PG_LEDGER_DEADLINE + 0.3
        t = time.monotonic()
        with pytest.raises(StateUnavailable):  # within RETRY_AFTER: at once, nothing more left behind
            await take()
        assert time.monotonic() - t < 0.05
        assert not await ledger.reachable()
        relay.thaw()
        await asyncio.sleep(PG_LEDGER_RETRY_AFTER + 0.1)
        t = time.monotonic()
        assert await take() == (8, 84)  # the abandoned lease never happened, or was rolled back
        assert time.monotonic() - t < 1.0 and await ledger.reachable()
        await ledger.aclose()

    try:
        asyncio.run(scenario())
    finally:
        relay.close()
        drop_postgres_table(table)


def test_the_postgres_query_histories_refuse_within_the_deadline_on_a_frozen_server_and_resume() -> None:
    relay = FreezableRelay(_target(POSTGRES_DSN))
    table = postgres_table()

    async def scenario() -> None:
        store = PostgresHistoryStore(_relayed(POSTGRES_DSN, relay), table=table)
        await store.update("k", lambda stored: b"1")
        relay.freeze()
        t = time.monotonic()
        with pytest.raises(StateUnavailable):
            await store.update("k", lambda stored: b"2")
        assert time.monotonic() - t < PG_LEDGER_DEADLINE + 0.3
        relay.thaw()
        seen: list[bytes | None] = []

        def step(stored: bytes | None) -> bytes:
            seen.append(stored)
            return b"3"

        await store.update("k", step)  # a new connection; the abandoned update was cancelled
        assert seen and seen[-1] in (b"1", b"2")
        await store.aclose()

    try:
        asyncio.run(scenario())
    finally:
        relay.close()
        drop_postgres_table(table + "_history")
        drop_postgres_table(table)
