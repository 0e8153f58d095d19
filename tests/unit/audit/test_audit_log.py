"""The audit chain from the insider's side: every edit, deletion, insertion, reordering,
consistent rewrite and truncation is caught, and the first bad record is named."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bastion.audit import AuditLog, SQLiteSink, chain_hash, checkpoint_message, encode_body, verify_audit
from bastion.audit.chain import load_or_create_audit_key, load_public_key, public_path
from bastion.audit.log import AuditUnavailable
from bastion.errors import AuditIntegrityError


def _fill(path: Path, key: Ed25519PrivateKey, n: int, *, every: int = 10) -> None:
    async def run() -> None:
        log = AuditLog(SQLiteSink(path, key, checkpoint_every_records=every, checkpoint_every_seconds=3600))
        seqs = await asyncio.gather(*(log.submit({"i": i, "status": 200}, wait=True) for i in range(n)))  # type: ignore[arg-type]
        assert sorted(seqs) == list(range(seqs[0], seqs[0] + n))  # one each, contiguous
        log.close()

    asyncio.run(run())


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def db(tmp_path: Path, key: Ed25519PrivateKey) -> Path:
    path = tmp_path / "audit.db"
    _fill(path, key, 50)
    return path


def _verify(db: Path, key: Ed25519PrivateKey) -> None:
    verify_audit(db, key.public_key())


def _tamper(db: Path, sql: str, *params: object) -> None:
    conn = sqlite3.connect(db)
    conn.execute(sql, params)
    conn.commit()
    conn.close()


def test_intact_log_verifies_with_group_commit_and_checkpoints(db: Path, key: Ed25519PrivateKey) -> None:
    report = verify_audit(db, key.public_key())
    assert report.records == 50
    assert report.checkpoints >= 5  # every 10 records, and one at close


def test_restart_continues_the_chain(db: Path, key: Ed25519PrivateKey) -> None:
    _fill(db, key, 7)
    assert verify_audit(db, key.public_key()).records == 57


def _expect(db: Path, key: Ed25519PrivateKey, seq: int, words: str) -> None:
    with pytest.raises(AuditIntegrityError) as err:
        _verify(db, key)
    assert err.value.seq == seq, str(err.value)
    assert words in str(err.value)


def test_edited_record(db: Path, key: Ed25519PrivateKey) -> None:
    _tamper(db, "UPDATE records SET body = replace(body, '\"status\":200', '\"status\":403') WHERE seq = 23")
    _expect(db, key, 23, "record 23: edited")


def test_edited_record_with_its_own_hash_recomputed(db: Path, key: Ed25519PrivateKey) -> None:
    conn = sqlite3.connect(db)
    prev, body = conn.execute("SELECT prev_hash, body FROM records WHERE seq = 23").fetchone()
    forged = body.replace('"status":200', '"status":403')
    conn.execute(
        "UPDATE records SET body = ?, hash = ? WHERE seq = 23", (forged, chain_hash(prev, forged.encode()))
    )
    conn.commit()
    conn.close()
    _expect(db, key, 24, "does not link to record 23")


def test_consistent_rewrite_is_caught_by_the_signed_checkpoint(db: Path, key: Ed25519PrivateKey) -> None:
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT seq, body, prev_hash FROM records ORDER BY seq").fetchall()
    prev = rows[0][2]
    for seq, body, _ in rows:
        if seq == 23:
            body = body.replace('"status":200', '"status":403')
        digest = chain_hash(prev, body.encode())
        conn.execute(
            "UPDATE records SET body = ?, prev_hash = ?, hash = ? WHERE seq = ?", (body, prev, digest, seq)
        )
        prev = digest
    conn.commit()
    conn.close()
    _expect(db, key, 30, "rewritten")  # the first checkpoint after record 23


def test_deleted_record(db: Path, key: Ed25519PrivateKey) -> None:
    _tamper(db, "DELETE FROM records WHERE seq = 12")
    _expect(db, key, 12, "record 12: deleted")


def test_deleted_and_renumbered(db: Path, key: Ed25519PrivateKey) -> None:
    _tamper(db, "DELETE FROM records WHERE seq = 12")
    _tamper(db, "UPDATE records SET seq = seq - 1 WHERE seq > 12")
    _expect(db, key, 12, "deleted")


def test_swapped_records(db: Path, key: Ed25519PrivateKey) -> None:
    _tamper(db, "UPDATE records SET seq = -seq WHERE seq IN (31, 32)")
    _tamper(db, "UPDATE records SET seq = 32 WHERE seq = -31")
    _tamper(db, "UPDATE records SET seq = 31 WHERE seq = -32")
    _expect(db, key, 31, "reordered")


def test_inserted_record(db: Path, key: Ed25519PrivateKey) -> None:
    _tamper(db, "UPDATE records SET seq = seq + 1000 WHERE seq >= 40")
    _tamper(db, "UPDATE records SET seq = seq - 999 WHERE seq >= 1040")
    body = encode_body({"i": -1, "status": 200, "seq": 40}).decode()
    _tamper(db, "INSERT INTO records VALUES (40, ?, 'x', 'y')", body)
    _expect(db, key, 40, "record 40")


def test_truncated_tail_is_caught_by_the_last_checkpoint(db: Path, key: Ed25519PrivateKey) -> None:
    _tamper(db, "DELETE FROM records WHERE seq > 44")
    _expect(db, key, 45, "record 45: deleted")


def test_forged_checkpoint_signature(db: Path, key: Ed25519PrivateKey) -> None:
    other = Ed25519PrivateKey.generate()
    conn = sqlite3.connect(db)
    seq, digest = conn.execute("SELECT seq, hash FROM checkpoints ORDER BY seq LIMIT 1").fetchone()
    conn.close()
    _tamper(
        db,
        "UPDATE checkpoints SET signature = ? WHERE seq = ?",
        other.sign(checkpoint_message(seq, digest)).hex(),
        seq,
    )
    _expect(db, key, seq, "bad signature")


def test_records_hold_no_payload_and_the_key_files_are_owner_only(tmp_path: Path) -> None:
    key = load_or_create_audit_key(tmp_path / "audit.key")
    assert oct((tmp_path / "audit.key").stat().st_mode & 0o777) == "0o600"
    pub = load_public_key(public_path(tmp_path / "audit.key"))
    assert pub.public_bytes_raw() == key.public_key().public_bytes_raw()


def test_best_effort_does_not_wait_but_still_records(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    async def run() -> None:
        log = AuditLog(SQLiteSink(tmp_path / "a.db", key))
        assert log.submit({"i": 1}, wait=False) is None
        log.close()

    asyncio.run(run())
    assert verify_audit(tmp_path / "a.db", key.public_key()).records == 1


def test_writer_failure_fails_closed(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    async def run() -> None:
        log = AuditLog(SQLiteSink(tmp_path / "a.db", key))
        await log.submit({"i": 1}, wait=True)  # type: ignore[misc]
        log.sink._conn.execute("PRAGMA query_only = 1")  # type: ignore[attr-defined]  # the disk refuses writes from now on
        with pytest.raises(AuditUnavailable):
            await log.submit({"i": 2}, wait=True)  # type: ignore[misc]
        assert not log.healthy
        with pytest.raises(AuditUnavailable):
            log.submit({"i": 3}, wait=True)
        log.close()

    asyncio.run(run())
