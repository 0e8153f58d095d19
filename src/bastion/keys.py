"""API keys: 256 bits of randomness behind a public key id, stored only as a hash.

A key reads `bst_<key id>_<secret>`. The key id is public (it names the
principal in logs and metrics); the secret is shown once at creation and only
its SHA-256 is kept. A slow password hash buys nothing for a 256-bit random
secret, and would cost every request. Lookups read the database each time, so a
revocation made by the CLI in another process takes effect on the next request:
records are cached, but the cache is dropped whenever SQLite's `data_version`
says another connection has committed (one cheap pragma per lookup).

`KeyRecords` is the interface the server and the CLI use; `KeyStore` keeps the keys in a SQLite
file (the embedded default), `SharedKeyStore` in Redis or PostgreSQL through `bastion.records`,
where a revocation or quarantine made on one replica is seen by every replica within 0.25 s.
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
from typing import Any, Protocol

from bastion.errors import AuthenticationFailed
from bastion.files import open_shared_sqlite
from bastion.records import UNCHANGED, Records, Watch, update

KEY_PREFIX = "bst_"
CERT_PRINCIPAL_PREFIX = "cert:"  # a service identity's principal id (bastion.certs), never a key id
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
_CERT_PRINCIPAL = re.compile(r"cert:[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # quarantined service identities
_KEY_ID_IN_KEY = re.compile(rf"{KEY_PREFIX}([0-9a-f]{{{_KEY_ID_HEX}}})(?:_|$)")


def key_id_of(value: str) -> str | None:
    """The key id named by `value`: a bare key id (16 hex digits), a service identity's principal id
    (`cert:<name>`), or the id part of something shaped like a full key (`bst_<id>_...`, even a
    truncated one); None for anything else.

    For commands that take a key id: a pasted full key is recognised, and only its public id is used
    or repeated, never the secret after it.
    """
    if _KEY_ID.fullmatch(value) or _CERT_PRINCIPAL.fullmatch(value):
        return value
    match = _KEY_ID_IN_KEY.match(value)
    return None if match is None else match.group(1)


class KeyRecords(Protocol):
    """API keys and their state (revoked, quarantined), wherever they are kept. Every method may raise
    `StateUnavailable` (503) when the keys are in a server that cannot be reached."""

    def create(self, *, name: str, roles: list[str], now: float, expires_at: float | None = None) -> NewKey: ...

    def get(self, key_id: str) -> KeyRecord | None: ...

    def list(self) -> list[KeyRecord]:
        """Every key, oldest first."""
        ...

    def revoke(self, key_id: str, *, now: float) -> bool:
        """True if the key existed and was not revoked."""
        ...

    def quarantine(self, key_id: str, *, now: float) -> bool:
        """Refuse the key's requests (403) until an operator releases it; True if it was not already."""
        ...

    def release(self, key_id: str) -> bool:
        """Lift a quarantine; True if the key was quarantined."""
        ...

    def authenticate(self, presented: str, *, now: float) -> KeyRecord:
        """The key's record or AuthenticationFailed; the secret is compared in constant time."""
        ...

    def require_active(self, record: KeyRecord, *, now: float) -> None: ...

    def close(self) -> None: ...


def _verify(parsed: tuple[str, str], row: tuple[KeyRecord, bytes] | None, *, now: float) -> KeyRecord:
    """The record behind a parsed key if its secret matches and it is not revoked or expired."""
    _, full = parsed
    # Hash even for an unknown id so that timing does not tell which ids exist.
    candidate = _hash_secret(full)
    if row is None:
        hmac.compare_digest(candidate, b"\0" * 32)
        raise AuthenticationFailed("unknown_key")
    record, stored = row
    if not hmac.compare_digest(candidate, stored):
        raise AuthenticationFailed("wrong_secret")
    require_active(record, now=now)
    return record


def require_active(record: KeyRecord, *, now: float) -> None:
    """Revoked and expired keys fail authentication; a quarantined key is who it says it is,
    and the containment gate refuses it with 403."""
    status = record.status(now)
    if status not in ("active", "quarantined"):
        raise AuthenticationFailed(f"key_{status}")


class KeyStore:
    """API keys in a SQLite file (WAL), shared by the server and the CLI."""

    def __init__(self, path: Path) -> None:
        self._conn = open_shared_sqlite(path, _SCHEMA)
        columns = {row[1] for row in self._conn.execute("PRAGMA table_info(api_keys)")}
        if "quarantined_at" not in columns:  # a key file from before query auditing
            self._conn.execute("ALTER TABLE api_keys ADD COLUMN quarantined_at REAL")
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[KeyRecord, bytes] | None] = {}  # None: a service identity's absent row
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
            if key_id in self._cache:
                return self._cache[key_id]
            row = self._conn.execute(
                "SELECT key_id, name, roles, created_at, expires_at, revoked_at, quarantined_at, "
                "secret_hash FROM api_keys WHERE key_id = ?",
                (key_id,),
            ).fetchone()
            if row is None:
                # Unknown key ids are not cached (an attacker could fill the cache with them); a service
                # identity's usually absent row is: the policy names those, and a request makes none up.
                if key_id.startswith(CERT_PRINCIPAL_PREFIX):
                    self._cache[key_id] = None
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

    def _service_row(self, key_id: str, *, now: float) -> None:
        """A service identity (`cert:<name>`, bastion.certs) has no key, but can be quarantined or
        revoked like one: in a row of its own, with no secret hash any key could match and no roles
        (the policy file gives those). Its certificate is then refused (revoked) or contained."""
        if key_id.startswith(CERT_PRINCIPAL_PREFIX):
            with self._lock:
                self._conn.execute(
                    "INSERT OR IGNORE INTO api_keys VALUES (?, ?, ?, '[]', ?, NULL, NULL, NULL)",
                    (key_id, b"", key_id, now),
                )

    def revoke(self, key_id: str, *, now: float) -> bool:
        self._service_row(key_id, now=now)
        return self._change(
            "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL", (now, key_id)
        )

    def quarantine(self, key_id: str, *, now: float) -> bool:
        """Refuse the key's requests (403) until an operator releases it; True if it was not already.

        A service identity (`cert:<name>`) is quarantined too (see `_service_row`)."""
        self._service_row(key_id, now=now)
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
        return _verify(parsed, self._row(parsed[0]), now=now)

    def require_active(self, record: KeyRecord, *, now: float) -> None:
        require_active(record, now=now)


_KEYS = "api_keys"  # the shared collection


class SharedKeyStore:
    """API keys in Redis or PostgreSQL (`bastion.records`): one record per key id, holding the
    secret's SHA-256 only. Found records are cached; the cache is dropped when the collection's
    counter moved (read at most every 0.25 s), so another replica's revocation or quarantine is
    seen within that. Unknown key ids are not cached (a read each: the failed-auth limiter bounds them);
    a service identity's absent record is (the policy bounds those names)."""

    def __init__(self, records: Records) -> None:
        self._records = records
        self._watch = Watch(records, _KEYS)
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[KeyRecord, bytes] | None] = {}  # None: a service identity's absent record

    def close(self) -> None:
        self._records.close()

    def create(self, *, name: str, roles: list[str], now: float, expires_at: float | None = None) -> NewKey:
        while True:
            key_id = secrets.token_hex(_KEY_ID_HEX // 2)
            secret = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(_SECRET_BYTES)}"
            stored = {
                "secret_hash": _hash_secret(secret).hex(),
                "name": name,
                "roles": list(roles),
                "created_at": now,
                "expires_at": expires_at,
                "revoked_at": None,
                "quarantined_at": None,
            }
            if self._records.swap(_KEYS, key_id, None, json.dumps(stored, sort_keys=True)):
                break  # else a 64-bit id collided: draw again
        with self._lock:
            self._watch.invalidate()
        return NewKey(KeyRecord(key_id, name, tuple(roles), now, expires_at, None), secret)

    def get(self, key_id: str) -> KeyRecord | None:
        row = self._row(key_id)
        return None if row is None else row[0]

    def _row(self, key_id: str) -> tuple[KeyRecord, bytes] | None:
        with self._lock:
            if self._watch.stale() or len(self._cache) > _CACHE_MAX:
                self._cache.clear()
            if key_id in self._cache:
                return self._cache[key_id]
            text = self._records.get(_KEYS, key_id)
            if text is None:
                # A service identity's record (`cert:<name>`) is usually absent: cached as absent, else
                # every certificate request made a round trip for it. The same counter drops it when
                # any replica quarantines or revokes it. Unknown key ids are not cached (see above).
                if key_id.startswith(CERT_PRINCIPAL_PREFIX):
                    self._cache[key_id] = None
                return None
            found = _shared_record(key_id, json.loads(text))
            self._cache[key_id] = found
            return found

    def list(self) -> list[KeyRecord]:
        found = [_shared_record(k, json.loads(v))[0] for k, v in self._records.items(_KEYS).items()]
        return sorted(found, key=lambda r: (r.created_at, r.key_id))

    def _set(self, key_id: str, field: str, value: float | None) -> bool:
        def change(current: dict[str, Any] | None) -> Any:
            if current is None or (current[field] is None) == (value is None):
                return UNCHANGED  # no such key, or already in that state
            return {**current, field: value}

        changed = update(self._records, _KEYS, key_id, change)
        with self._lock:
            self._watch.invalidate()
        return changed

    def _service_row(self, key_id: str, *, now: float) -> None:
        """A service identity's record (`cert:<name>`), as KeyStore._service_row: no secret, no roles."""
        if key_id.startswith(CERT_PRINCIPAL_PREFIX):
            stored = {
                "secret_hash": "",
                "name": key_id,
                "roles": [],
                "created_at": now,
                "expires_at": None,
                "revoked_at": None,
                "quarantined_at": None,
            }
            self._records.swap(_KEYS, key_id, None, json.dumps(stored, sort_keys=True))  # only if absent

    def revoke(self, key_id: str, *, now: float) -> bool:
        self._service_row(key_id, now=now)
        return self._set(key_id, "revoked_at", now)

    def quarantine(self, key_id: str, *, now: float) -> bool:
        self._service_row(key_id, now=now)
        return self._set(key_id, "quarantined_at", now)

    def release(self, key_id: str) -> bool:
        return self._set(key_id, "quarantined_at", None)

    def authenticate(self, presented: str, *, now: float) -> KeyRecord:
        parsed = parse_key(presented)
        if parsed is None:
            raise AuthenticationFailed("malformed_key")
        return _verify(parsed, self._row(parsed[0]), now=now)

    def require_active(self, record: KeyRecord, *, now: float) -> None:
        require_active(record, now=now)


def _shared_record(key_id: str, stored: dict[str, Any]) -> tuple[KeyRecord, bytes]:
    record = KeyRecord(
        key_id,
        stored["name"],
        tuple(stored["roles"]),
        stored["created_at"],
        stored["expires_at"],
        stored["revoked_at"],
        stored["quarantined_at"],
    )
    return record, bytes.fromhex(stored["secret_hash"])
