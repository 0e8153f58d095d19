"""Several writers on one chain: threads and processes appending to one SQLite file or one
PostgreSQL table get distinct, gapless sequence numbers and a chain that verifies; a PostgreSQL
chain edited from the attacker's side fails verification naming the record; a PostgreSQL that
refuses or drops the connection fails the waiting records closed, and the log resumes."""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bastion.audit import AuditLog, AuditSink, SQLiteSink, checkpoint_message
from bastion.audit.log import AuditUnavailable
from bastion.audit.postgres import PostgresSink
from bastion.audit.verify import AuditSource, VerifyReport, verify_chain
from bastion.errors import AuditIntegrityError, ConfigError
from tests.helpers import POSTGRES_DSN, drop_postgres_table, free_port, postgres_table
from tests.unit.audit.writers import process_writer, run_writer


def _threads(make: Callable[[], AuditSink], writers: int, n: int) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in range(writers)]
    start = threading.Barrier(writers)

    def target(w: int) -> None:
        out[w] = run_writer(make, w, n, start)

    threads = [threading.Thread(target=target, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return out


def _pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _processes(kind: str, where: str, key: Ed25519PrivateKey, writers: int, n: int) -> list[list[int]]:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    start = ctx.Barrier(writers)
    procs = [
        ctx.Process(target=process_writer, args=(kind, where, POSTGRES_DSN, _pem(key), w, n, start, queue))
        for w in range(writers)
    ]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    return results


def _check(results: list[list[int]], source: AuditSource, key: Ed25519PrivateKey, total: int) -> None:
    rows, checkpoints = source.read()
    report = verify_chain(rows, checkpoints, key.public_key())
    seqs = sorted(s for r in results for s in r)
    assert seqs == list(range(1, total + 1))  # each record its own number, none missing
    assert all(len(r) == total // len(results) for r in results)
    assert report.records == total
    assert report.checkpoints >= total // 7
    writers = [orjson.loads(body)["writer"] for _, body, _, _ in rows]
    switches = sum(a != b for a, b in itertools.pairwise(writers))
    assert switches >= len(results), "the writers took turns: their batches are interleaved in one chain"


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def table() -> Iterator[str]:
    name = postgres_table()
    yield name
    for suffix in ("", "_checkpoints", "_signer"):
        drop_postgres_table(name + suffix)


def _pg(key: Ed25519PrivateKey, table: str, **kw: Any) -> PostgresSink:
    return PostgresSink(POSTGRES_DSN, key, table=table, **kw)


def _verify_pg(table: str, key: Ed25519PrivateKey) -> VerifyReport:
    return verify_chain(*AuditSource.postgres(POSTGRES_DSN, table).read(), key.public_key())


def test_sqlite_threads_share_one_chain(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    db = tmp_path / "audit.db"
    results = _threads(lambda: SQLiteSink(db, key, checkpoint_every_records=7), 4, 60)
    _check(results, AuditSource.sqlite(db), key, 240)


@pytest.mark.slow
def test_writers_opening_a_fresh_chain_together_all_start(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    # Workers starting together on a new state directory: SQLite's switch to WAL does not wait on its
    # busy handler ("database is locked" at once), and a -journal may vanish between a look and a
    # chmod. Eight openers at once, twenty fresh files: every one starts.
    for i in range(20):
        db = tmp_path / f"audit-{i}.db"
        start = threading.Barrier(8)
        errors: list[BaseException] = []

        def open_sink(
            db: Path = db, start: threading.Barrier = start, errors: list[BaseException] = errors
        ) -> None:
            start.wait()
            try:
                SQLiteSink(db, key).close()
            except BaseException as e:  # collected: the assertion names it
                errors.append(e)

        threads = [threading.Thread(target=open_sink) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert errors == [], errors


@pytest.mark.slow
def test_sqlite_processes_share_one_chain(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    db = tmp_path / "audit.db"
    results = _processes("sqlite", str(db), key, 3, 80)
    _check(results, AuditSource.sqlite(db), key, 240)


@pytest.mark.services
def test_postgres_threads_share_one_chain(table: str, key: Ed25519PrivateKey) -> None:
    results = _threads(lambda: _pg(key, table, checkpoint_every_records=7), 4, 60)
    _check(results, AuditSource.postgres(POSTGRES_DSN, table), key, 240)


@pytest.mark.slow
def test_postgres_processes_share_one_chain(table: str, key: Ed25519PrivateKey) -> None:
    results = _processes("postgres", table, key, 3, 80)
    _check(results, AuditSource.postgres(POSTGRES_DSN, table), key, 240)


def test_a_writer_with_another_key_refuses_to_start(table: str, key: Ed25519PrivateKey) -> None:
    _pg(key, table).close()
    with pytest.raises(ConfigError, match="signed with another audit key"):
        _pg(Ed25519PrivateKey.generate(), table)


def test_fsync_false_commits_without_waiting_for_the_wal_flush(table: str, key: Ed25519PrivateKey) -> None:
    for fsync, expected in ((False, "off"), (True, "on")):
        sink = _pg(key, table, fsync=fsync)
        conn = sink._connection()
        assert conn.execute("SHOW synchronous_commit").fetchone() == (expected,)
        sink.close()


# The attacker's side: write access to the PostgreSQL tables, no signing key.


@pytest.fixture
def filled(table: str, key: Ed25519PrivateKey) -> str:
    _threads(lambda: _pg(key, table, checkpoint_every_records=10, checkpoint_every_seconds=3600), 2, 25)
    assert _verify_pg(table, key).records == 50
    return table


def _tamper(*statements: str) -> None:
    with psycopg.connect(POSTGRES_DSN) as conn:
        for sql in statements:
            conn.execute(sql)


def _expect(table: str, key: Ed25519PrivateKey, seq: int, words: str) -> None:
    with pytest.raises(AuditIntegrityError) as err:
        _verify_pg(table, key)
    assert err.value.seq == seq, str(err.value)
    assert words in str(err.value)


@pytest.mark.services
def test_postgres_updated_field_is_caught(filled: str, key: Ed25519PrivateKey) -> None:
    _tamper(f"""UPDATE {filled} SET body = replace(body, '"i":', '"i":1') WHERE seq = 23""")
    _expect(filled, key, 23, "record 23: edited")


@pytest.mark.services
def test_postgres_deleted_row_is_caught(filled: str, key: Ed25519PrivateKey) -> None:
    _tamper(f"DELETE FROM {filled} WHERE seq = 12")
    _expect(filled, key, 12, "record 12: deleted")


@pytest.mark.services
def test_postgres_reordered_seq_is_caught(filled: str, key: Ed25519PrivateKey) -> None:
    _tamper(
        f"UPDATE {filled} SET seq = -seq WHERE seq IN (31, 32)",
        f"UPDATE {filled} SET seq = 32 WHERE seq = -31",
        f"UPDATE {filled} SET seq = 31 WHERE seq = -32",
    )
    _expect(filled, key, 31, "reordered")


@pytest.mark.services
def test_postgres_truncated_tail_and_forged_checkpoint_are_caught(
    filled: str, key: Ed25519PrivateKey
) -> None:
    _tamper(f"DELETE FROM {filled} WHERE seq > 44")
    _expect(filled, key, 45, "record 45: deleted")
    forged = Ed25519PrivateKey.generate().sign(checkpoint_message(44, "0" * 64)).hex()
    _tamper(
        f"DELETE FROM {filled}_checkpoints WHERE seq > 44",
        f"UPDATE {filled}_checkpoints SET signature = '{forged}'",
    )
    _expect(filled, key, 10, "bad signature")  # the first checkpoint: every 10 records


# PostgreSQL unavailable: fail closed, then resume.


def test_a_dsn_that_refuses_fails_closed_and_is_not_ready(key: Ed25519PrivateKey) -> None:
    dsn = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"  # nothing listens there

    async def run() -> None:
        log = AuditLog(PostgresSink(dsn, key, table="bastion_audit", timeout=1), retry_seconds=0.1)
        assert not await log.reachable()
        future = log.submit({"i": 1}, wait=True)
        assert future is not None
        with pytest.raises(AuditUnavailable):
            await future
        assert not log.healthy
        with pytest.raises(AuditUnavailable):  # refused at once while the database is away
            log.submit({"i": 2}, wait=True)
        await asyncio.sleep(0.3)
        assert not log.healthy  # probed, still refused
        log.close()

    asyncio.run(run())


def test_a_dropped_connection_fails_the_batch_closed_and_the_log_resumes(
    table: str, key: Ed25519PrivateKey
) -> None:
    async def run() -> None:
        log = AuditLog(_pg(key, table), retry_seconds=0.1)
        assert await log.submit({"i": 1}, wait=True) == 1  # type: ignore[misc]
        sink = log.sink
        assert isinstance(sink, PostgresSink)
        pid = sink._connection().info.backend_pid
        _tamper(f"SELECT pg_terminate_backend({pid})")
        future = log.submit({"i": 2}, wait=True)
        assert future is not None
        with pytest.raises(AuditUnavailable):
            await future
        assert not log.healthy and not await log.reachable()
        for _ in range(50):  # the probe reconnects within its retry interval
            await asyncio.sleep(0.1)
            if log.healthy:
                break
        assert log.healthy and await log.reachable()
        assert await log.submit({"i": 3}, wait=True) == 2  # no gap for the lost one
        log.close()

    asyncio.run(run())
    assert _verify_pg(table, key).records == 2


def _load_key(path: str, queue: Any) -> None:
    from bastion.audit.chain import load_or_create_audit_key

    queue.put(load_or_create_audit_key(Path(path)).public_key().public_bytes_raw())


@pytest.mark.slow
def test_processes_starting_together_on_a_fresh_directory_agree_on_one_signing_key(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")  # fork: the processes start within a millisecond
    queue = ctx.Queue()
    path = tmp_path / "state" / "audit_signing.key"
    procs = [ctx.Process(target=_load_key, args=(str(path), queue)) for _ in range(4)]
    for p in procs:
        p.start()
    keys = {queue.get(timeout=60) for _ in procs}
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert len(keys) == 1
    assert path.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["audit_signing.key", "audit_signing.pub"]
