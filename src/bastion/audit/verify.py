"""`bastion audit verify`: walk the chain and the checkpoints; name the first bad record.

Needs only the records (a SQLite file, or read access to the PostgreSQL tables) and the
writers' public key: anyone can run it.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from bastion.audit.chain import GENESIS, Row, chain_hash, checkpoint_message
from bastion.errors import AuditIntegrityError

if TYPE_CHECKING:
    from bastion.config import AuditSettings
    from bastion.statedir import StatePaths

log = logging.getLogger("bastion.audit")


@dataclass(frozen=True, slots=True)
class VerifyReport:
    records: int
    checkpoints: int
    head: str


def _request_id(body: str) -> object:
    try:
        return orjson.loads(body).get("request_id")
    except (orjson.JSONDecodeError, AttributeError):
        return None


def _body_seq(body: str) -> int | None:
    try:
        value = orjson.loads(body).get("seq")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return value if isinstance(value, int) else None


def read_sqlite(path: Path) -> tuple[list[Row], list[tuple[int, str, str]]]:
    """Every record and checkpoint of an audit database, in `seq` order, read in one snapshot (a
    server may be appending). Raises AuditIntegrityError when the file is missing or unreadable."""
    if not path.is_file():
        raise AuditIntegrityError(f"{path}: audit database not found", seq=None)
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    try:
        conn.execute("BEGIN")
        rows = conn.execute("SELECT seq, body, prev_hash, hash FROM records ORDER BY seq").fetchall()
        checkpoints = conn.execute("SELECT seq, hash, signature FROM checkpoints ORDER BY seq").fetchall()
        conn.execute("COMMIT")
    except sqlite3.DatabaseError as e:
        raise AuditIntegrityError(f"{path}: not a readable audit database: {e}", seq=None) from None
    finally:
        conn.close()
    return rows, checkpoints


def verify_audit(path: Path, public_key: Ed25519PublicKey) -> VerifyReport:
    """Return a report when the log is intact; raise AuditIntegrityError naming the first bad record."""
    rows, checkpoints = read_sqlite(path)
    return verify_chain(rows, checkpoints, public_key)


def verify_chain(
    rows: list[Row], checkpoints: list[tuple[int, str, str]], public_key: Ed25519PublicKey
) -> VerifyReport:
    """The walk itself, whatever stored the rows: (seq, body, prev_hash, hash) and checkpoints
    (seq, hash, signature hex), both in `seq` order. Raises AuditIntegrityError at the first bad record."""
    body_seqs = {s for s in (_body_seq(r[1]) for r in rows) if s is not None}
    computed: dict[int, str] = {}
    expected_seq, prev = 1, GENESIS
    for seq, body, stored_prev, stored_hash in rows:
        # 1. Positions are contiguous from 1: a gap means records were removed.
        if seq != expected_seq:
            raise AuditIntegrityError(
                f"record {expected_seq}: deleted (the log jumps from {expected_seq - 1} to {seq})",
                seq=expected_seq,
            )
        # 2. Each record carries its own sequence number: another one here means reordering or insertion.
        claimed = _body_seq(body)
        if claimed is None:
            raise AuditIntegrityError(f"record {seq}: edited (its body is not a valid record)", seq=seq)
        if claimed != seq:
            if seq in body_seqs:
                kind = "reordered (it holds record {claimed}, record {seq} stands elsewhere)"
            elif claimed > seq:
                kind = "deleted (record {seq} is missing; record {claimed} stands in its place)"
            else:
                kind = "inserted (record {claimed} appears twice)"
            raise AuditIntegrityError(f"record {seq}: " + kind.format(claimed=claimed, seq=seq), seq=seq)
        # 3. The link to the previous record, then the record's own hash.
        if stored_prev != prev:
            raise AuditIntegrityError(
                f"record {seq}: does not link to record {seq - 1} (a record was edited, inserted or replaced)",
                seq=seq,
            )
        digest = chain_hash(prev, body.encode())
        if digest != stored_hash:
            raise AuditIntegrityError(f"record {seq}: edited (its content does not match its hash)", seq=seq)
        computed[seq] = digest
        prev = digest
        expected_seq += 1

    # 4. Signed checkpoints pin the chain: a consistent rewrite or a cut-off tail breaks them.
    last = expected_seq - 1
    for cp_seq, cp_hash, signature in checkpoints:
        try:
            public_key.verify(bytes.fromhex(signature), checkpoint_message(cp_seq, cp_hash))
        except (InvalidSignature, ValueError):
            raise AuditIntegrityError(f"checkpoint at record {cp_seq}: bad signature", seq=cp_seq) from None
        if cp_seq > last:
            raise AuditIntegrityError(
                f"record {last + 1}: deleted (a signed checkpoint vouches for records up to {cp_seq}, "
                f"the log ends at {last})",
                seq=last + 1,
            )
        if computed[cp_seq] != cp_hash:
            raise AuditIntegrityError(
                f"records up to {cp_seq}: rewritten (the chain does not match the signed checkpoint)",
                seq=cp_seq,
            )
    return VerifyReport(records=last, checkpoints=len(checkpoints), head=prev)


def export_records(path: Path) -> list[bytes]:
    """Each record as one JSON line: its body plus the chain fields."""
    rows, _ = read_sqlite(path)
    return export_rows(rows)


def export_rows(rows: list[Row]) -> list[bytes]:
    """Each record (seq, body, prev_hash, hash) as one JSON line: its body plus the chain fields."""
    out = []
    for _seq, body, prev_hash, digest in rows:
        record = orjson.loads(body)
        record["prev_hash"], record["hash"] = prev_hash, digest
        out.append(orjson.dumps(record, option=orjson.OPT_SORT_KEYS))
    return out


@dataclass(frozen=True, slots=True)
class AuditSource:
    """Where `verify` and `export` read a chain: a SQLite file, or a PostgreSQL table (`dsn`, `table`).

    `name` is for messages: the path, or "postgresql table t" (never the DSN: it may hold a password)."""

    name: str
    path: Path | None = None
    dsn: str | None = None
    table: str | None = None

    @classmethod
    def sqlite(cls, path: Path) -> AuditSource:
        return cls(str(path), path=path)

    @classmethod
    def postgres(cls, dsn: str, table: str) -> AuditSource:
        return cls(f"postgresql table {table}", dsn=dsn, table=table)

    @classmethod
    def configured(cls, settings: AuditSettings, paths: StatePaths) -> AuditSource:
        """The chain `[audit]` names: `state_dir/audit.db`, or the PostgreSQL table."""
        if settings.sink == "postgres":
            return cls.postgres(settings.postgres_dsn, settings.postgres_table)
        return cls.sqlite(paths.audit)

    def find_request(self, request_id: str) -> int | None:
        """The sequence number of the record of request `request_id`; None when there is none or the
        store cannot be read (a report without it is still useful)."""
        for seq, body in self._search(request_id) or []:
            if _request_id(body) == request_id:
                return int(seq)
        return None

    def find_changes(self, targets: set[str]) -> list[dict[str, Any]] | None:
        """The operators' changes to `targets` (`incident:3`, `key:<id>`, `model:<name>`): each record
        whose `target` is one of them, in `seq` order (seq, ts, route, principal, change, status);
        never a payload. None when the store cannot be read."""
        found: dict[int, dict[str, Any]] = {}
        for target in sorted(targets):
            rows = self._search(orjson.dumps({"target": target}).decode()[1:-1])
            if rows is None:
                return None
            for seq, body in rows:
                try:
                    record = orjson.loads(body)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(record, dict) and record.get("target") == target:
                    keep = ("ts", "route", "principal", "via", "change", "status", "request_id")
                    found[int(seq)] = {"seq": int(seq), **{k: record.get(k) for k in keep}}
        return [found[s] for s in sorted(found)]

    def _search(self, text: str) -> list[tuple[Any, str]] | None:
        """(seq, body) of the records whose body contains `text`; None when the store cannot be read."""
        import psycopg

        pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        try:
            if self.path is not None:
                if not self.path.is_file():
                    return []
                with contextlib.closing(sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)) as db:
                    return db.execute(
                        "SELECT seq, body FROM records WHERE body LIKE ? ESCAPE '\\' ORDER BY seq", (pattern,)
                    ).fetchall()
            from bastion.audit.postgres import TABLE_NAME, connect_kwargs

            assert self.dsn is not None and self.table is not None and TABLE_NAME.match(self.table)
            with psycopg.connect(self.dsn, **connect_kwargs(30.0, bound_statements=False)) as conn:
                return conn.execute(
                    f"SELECT seq, body FROM {self.table} WHERE body LIKE %s ESCAPE '\\' ORDER BY seq",
                    (pattern,),
                ).fetchall()
        except (sqlite3.Error, psycopg.Error) as e:
            log.warning("audit records not searched: %s", type(e).__name__)
            return None

    def read(self) -> tuple[list[Row], list[tuple[int, str, str]]]:
        """Records and checkpoints in `seq` order, one snapshot. Raises AuditIntegrityError when the
        store is missing or cannot be read."""
        if self.path is not None:
            return read_sqlite(self.path)
        assert self.dsn is not None and self.table is not None
        import psycopg

        from bastion.audit.postgres import read_postgres

        try:
            return read_postgres(self.dsn, self.table)
        except psycopg.errors.UndefinedTable:
            raise AuditIntegrityError(f"{self.name}: audit table not found", seq=None) from None
        except psycopg.Error as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise AuditIntegrityError(
                f"{self.name}: cannot read: {type(e).__name__}: {first}", seq=None
            ) from None
