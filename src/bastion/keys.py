"""API keys: 256 bits of randomness behind a public key id, stored only as a hash.

A key reads `bst_<key id>_<secret>`. The key id is public (it names the
principal in logs and metrics); the secret is shown once at creation and only
its SHA-256 is kept. A slow password hash buys nothing for a 256-bit random
secret, and would cost every request. Lookups read the database each time, so a
revocation made by the CLI in another process takes effect on the next request:
records are cached, but the cache is dropped whenever SQLite's `data_version`
says another connection has committed (one cheap pragma per lookup).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

from bastion.errors import AuthenticationFailed
from bastion.files import open_shared_sqlite

KEY_PREFIX = "bst_"
_KEY_ID_HEX = 16  # 64-bit public identifier
_SECRET_BYTES = 32  # 256 bits
_CACHE_MAX = 100_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    key_id      TEXT PRIMARY KEY,
    secret_hash BLOB NOT NULL,
    name        TEXT NOT NULL,
    roles       TEXT NOT NULL,
    created_at  REAL NOT NULL,
    expires_at  REAL,
    revoked_at  REAL,
    quarantined_at REAL
);
"""


@dataclass(frozen=True, slots=True)
class KeyRecord:
    key_id: str
    name: str
    roles: tuple[str, ...]
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    quarantined_at: float | None = None  # set by query auditing; the key authenticates but is refused

    def status(self, now: float) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        if self.quarantined_at is not None:
            return "quarantined"
        return "active"


@dataclass(frozen=True, slots=True)
class NewKey:
    record: KeyRecord
    secret: str  # the full key, to be shown once and never stored


def _hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


_KEY_SHAPE = re.compile(rf"{KEY_PREFIX}([0-9a-f]{{{_KEY_ID_HEX}}})_[A-Za-z0-9_-]{{43,}}")


def parse_key(presented: str) -> tuple[str, str] | None:
    """Split `bst_<id>_<secret>` into (key id, full key); None when it is not shaped like a key."""
    match = _KEY_SHAPE.fullmatch(presented)
    return None if match is None else (match.group(1), presented)


_KEY_ID = re.compile(rf"[0-9a-f]{{{_KEY_ID_HEX}}}")
_KEY_ID_IN_KEY = re.compile(rf"{KEY_PREFIX}([0-9a-f]{{{_KEY_ID_HEX}}})(?:_|$)")


def key_id_of(value: str) -> str | None:
    """The key id named by `value`: a bare key id (16 hex digits), or the id part of something shaped
    like a full key (`bst_<id>_...`, even a truncated one); None for anything else.

    For commands that take a key id: a pasted full key is recognised, and only its public id is used
    or repeated, never the secret after it.
    """
    if _KEY_ID.fullmatch(value):
        return value
    match = _KEY_ID_IN_KEY.match(value)
    return None if match is None else match.group(1)


class KeyStore:
    """API keys in a SQLite file (WAL), shared by the server and the CLI."""

    def __init__(self, path: Path) -> None:
        self._conn = open_shared_sqlite(path, _SCHEMA)
        columns = {row[1] for row in self._conn.execute("PRAGMA table_info(api_keys)")}
        if "quarantined_at" not in columns:  # a key file from before query auditing
            self._conn.execute("ALTER TABLE api_keys ADD COLUMN quarantined_at REAL")
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[KeyRecord, bytes]] = {}
        self._seen_version: int | None = None

    def close(self) -> None:
        self._conn.close()

    def create(self, *, name: str, roles: list[str], now: float, expires_at: float | None = None) -> NewKey:
        key_id = secrets.token_hex(_KEY_ID_HEX // 2)
        secret = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(_SECRET_BYTES)}"
        with self._lock:
            self._cache.clear()
            self._conn.execute(
                "INSERT INTO api_keys VALUES (?, ?, ?, ?, ?, ?, NULL, NULL)",
                (key_id, _hash_secret(secret), name, json.dumps(roles), now, expires_at),
            )
        return NewKey(KeyRecord(key_id, name, tuple(roles), now, expires_at, None), secret)

    def get(self, key_id: str) -> KeyRecord | None:
        row = self._row(key_id)
        return None if row is None else row[0]

    def _row(self, key_id: str) -> tuple[KeyRecord, bytes] | None:
        with self._lock:
            (version,) = self._conn.execute("PRAGMA data_version").fetchone()
            if version != self._seen_version or len(self._cache) > _CACHE_MAX:
                self._cache.clear()
                self._seen_version = version
            cached = self._cache.get(key_id)
            if cached is not None:
                return cached
            row = self._conn.execute(
                "SELECT key_id, name, roles, created_at, expires_at, revoked_at, quarantined_at, "
                "secret_hash FROM api_keys WHERE key_id = ?",
                (key_id,),
            ).fetchone()
            if row is None:  # unknown ids are not cached: an attacker could fill the cache with them
                return None
            found = KeyRecord(row[0], row[1], tuple(json.loads(row[2])), *row[3:7]), row[7]
            self._cache[key_id] = found
            return found

    def list(self) -> list[KeyRecord]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT key_id, name, roles, created_at, expires_at, revoked_at, quarantined_at "
                "FROM api_keys ORDER BY created_at"
            ).fetchall()
        return [KeyRecord(r[0], r[1], tuple(json.loads(r[2])), *r[3:7]) for r in rows]

    def _change(self, sql: str, parameters: tuple[object, ...]) -> bool:
        """One UPDATE of one key; True if it changed the row. The cache goes: the next lookup reads it."""
        with self._lock:
            self._cache.clear()
            return self._conn.execute(sql, parameters).rowcount == 1

    def revoke(self, key_id: str, *, now: float) -> bool:
        return self._change(
            "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL", (now, key_id)
        )

    def quarantine(self, key_id: str, *, now: float) -> bool:
        """Refuse the key's requests (403) until an operator releases it; True if it was not already."""
        return self._change(
            "UPDATE api_keys SET quarantined_at = ? WHERE key_id = ? AND quarantined_at IS NULL",
            (now, key_id),
        )

    def release(self, key_id: str) -> bool:
        """Lift a quarantine; True if the key was quarantined."""
        return self._change(
            "UPDATE api_keys SET quarantined_at = NULL WHERE key_id = ? AND quarantined_at IS NOT NULL",
            (key_id,),
        )

    def authenticate(self, presented: str, *, now: float) -> KeyRecord:
        """Return the key's record or raise AuthenticationFailed; the secret is compared in constant time."""
        parsed = parse_key(presented)
        if parsed is None:
            raise AuthenticationFailed("malformed_key")
        key_id, full = parsed
        row = self._row(key_id)
        # Hash even for an unknown id so that timing does not tell which ids exist.
        candidate = _hash_secret(full)
        if row is None:
            hmac.compare_digest(candidate, b"\0" * 32)
            raise AuthenticationFailed("unknown_key")
        record, stored = row
        if not hmac.compare_digest(candidate, stored):
            raise AuthenticationFailed("wrong_secret")
        self.require_active(record, now=now)
        return record

    def require_active(self, record: KeyRecord, *, now: float) -> None:
        """Revoked and expired keys fail authentication; a quarantined key is who it says it is,
        and the containment gate refuses it with 403."""
        status = record.status(now)
        if status not in ("active", "quarantined"):
            raise AuthenticationFailed(f"key_{status}")
