"""Shared records: keys, quarantines, isolations, containment measures, incidents and rollout state
in Redis or PostgreSQL, so that every replica on every host reads the same ones.

Why one mechanism, not five. Each of those stores is a handful of small records keyed by a name
(a key id, a model, an incident number) that change rarely and are read on every request. One
narrow interface, `Records`, holds them all: `get`, `items`, `swap` (compare-and-set of one
record's JSON text, insert and delete included), a change counter per collection (`version`)
and a sequence (`next_id`). It is implemented twice (`redis`: a hash per collection and one Lua
script per swap; `postgres`: one table, the swap and the counter in one transaction), and each
store's logic is written once over it (`SharedKeyStore` in `bastion.keys`, `SharedIsolationStore`,
`SharedMeasureStore`, `SharedIncidentStore`, `SharedRolloutStates`). The SQLite stores stay as they
were (their files, schemas and behaviour): they are the embedded default and need no migration.

Within one second, on any host. A store that caches (keys, isolations, measures) reads its
collection's counter at most every `CHECK_EVERY` seconds (0.25 s) and drops its cache when the
counter moved, so a change made by another replica or the CLI is seen within that interval; the
counter and the record change in one atomic step, and the counter is read before the records, so
a cache is never newer-labelled than its data. Between checks a request reads memory only.

Fail closed. A backend that cannot be reached raises `StateUnavailable` (503 `state_unavailable`):
authentication cannot succeed, nothing is answered. The clients block (a read is one round trip,
made at most every 0.25 s per store, or on a cache miss), so a server that does not answer costs
at most one short timeout (0.5 s for Redis; for PostgreSQL 2 s to connect, 1 s of unacknowledged
data, `tcp_user_timeout`), after which the backend is not asked again for `RETRY_AFTER` seconds:
requests fail at once instead of each waiting. Connection strings are never logged (only an
error's type).

`open_records(config, paths)` is the one place that chooses: SQLite files in the state directory
for `state.backend = "sqlite"` or `"memory"`, else the shared backend. Token revocations and
dashboard sessions are written only over `Records`: with SQLite they use a third implementation,
`bastion.records.sqlite` (`records.db` in the state directory). The server and the CLI both
call it; it lives here, not in `bastion.assembly`, because importing the assembly (every stage,
the language-model code) costs the CLI ~1.2 s per command.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from bastion.errors import StateUnavailable

if TYPE_CHECKING:
    from bastion.config import Config
    from bastion.containment import MeasureRecords
    from bastion.incidents import IncidentRecords
    from bastion.isolation import IsolationRecords
    from bastion.keys import KeyRecords
    from bastion.rollout import RolloutStateStore
    from bastion.sessions import SessionAuthority
    from bastion.statedir import StatePaths
    from bastion.tokens import TokenRevocations

log = logging.getLogger("bastion.records")

CHECK_EVERY = 0.25  # seconds a cache is used before its collection's counter is read again
RETRY_AFTER = 1.0  # seconds a backend that failed is not asked again (requests fail at once)
_SWAP_ATTEMPTS = 64


class Records(Protocol):
    """Collections of JSON records by key, shared by every replica. Every method raises
    `StateUnavailable` when the backend cannot be reached."""

    def get(self, collection: str, key: str) -> str | None:
        """The record's JSON text, or None."""
        ...

    def items(self, collection: str) -> dict[str, str]:
        """Every record of the collection: key -> JSON text."""
        ...

    def swap(self, collection: str, key: str, old: str | None, new: str | None) -> bool:
        """Compare-and-set: if the record is `old` (None: absent), make it `new` (None: delete it) and
        move the collection's counter, atomically; False (nothing changed) if it was not `old`."""
        ...

    def version(self, collection: str) -> int:
        """The collection's change counter: it moves with every successful swap (0 before any)."""
        ...

    def next_id(self, collection: str) -> int:
        """1, 2, 3...: a number no other call on any replica gets."""
        ...

    def reachable(self) -> bool: ...

    def close(self) -> None:
        """Drop the connections (idempotent; a later call connects again)."""
        ...


def unavailable(error: Exception) -> StateUnavailable:
    log.error("shared state unavailable: %s", type(error).__name__)  # never the URL: it may hold a password
    return StateUnavailable("shared state (keys, containment) unavailable; nothing was answered")


class Breaker:
    """After a failure, refuse at once for `RETRY_AFTER` seconds instead of waiting on a dead server."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._down_until = 0.0

    def check(self) -> None:
        if self._clock() < self._down_until:
            raise StateUnavailable("shared state (keys, containment) unavailable; nothing was answered")

    def failed(self, error: Exception) -> StateUnavailable:
        self._down_until = self._clock() + RETRY_AFTER
        return unavailable(error)


UNCHANGED: Any = object()  # returned by an `update` change function: leave the record as it is


def update(records: Records, collection: str, key: str, change: Callable[[Any], Any]) -> bool:
    """Read-modify-write one record with `swap`, again if another writer came first.

    `change(current)` gets the decoded record (None: absent) and returns the new one (None: delete
    it) or `UNCHANGED`; it may raise to refuse. True if the record was changed.
    """
    for _ in range(_SWAP_ATTEMPTS):
        old = records.get(collection, key)
        new = change(None if old is None else json.loads(old))
        if new is UNCHANGED:
            return False
        text = None if new is None else json.dumps(new, sort_keys=True)
        if text == old:
            return False
        if records.swap(collection, key, old, text):
            return True
    raise StateUnavailable(f"shared state: {collection} record kept changing; nothing was changed")


class Watch:
    """Whether a cache built from a collection must be dropped: the collection's counter, read at
    most every `CHECK_EVERY` seconds. Call under the cache's lock."""

    def __init__(
        self, records: Records, collection: str, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._records = records
        self._collection = collection
        self._clock = clock
        self._checked = float("-inf")
        self._seen: int | None = None

    def stale(self) -> bool:
        """True when the cache must be rebuilt (read the records after this call, not before)."""
        now = self._clock()
        if now - self._checked < CHECK_EVERY:
            return False
        version = self._records.version(self._collection)  # raises StateUnavailable: nothing cached is used
        self._checked = now
        if version != self._seen:
            self._seen = version
            return True
        return False

    def invalidate(self) -> None:
        """This process changed the collection: read it again on the next call."""
        self._checked, self._seen = float("-inf"), None


@dataclass
class RecordStores:
    """The stores one server (or one CLI command) works with."""

    keys: KeyRecords
    isolation: IsolationRecords
    incidents: IncidentRecords
    measures: MeasureRecords
    rollouts: RolloutStateStore
    shared: Records | None  # None: SQLite files in the state directory
    # Written only over `Records`: the shared backend's, or `records.db` in the state directory
    # (bastion.records.sqlite), which every worker on it shares.
    token_revocations: TokenRevocations
    sessions: SessionAuthority
    records: Records

    def close(self) -> None:
        for store in (self.keys, self.isolation, self.incidents, self.measures):
            store.close()
        if self.shared is not None:
            self.shared.close()
        self.records.close()


def open_records(config: Config, paths: StatePaths) -> RecordStores:
    """The one place that decides where keys, quarantines, isolations, measures, incidents and
    rollout state live: `state.backend` redis or postgres shares them; sqlite and memory keep them
    in SQLite files (and `rollouts.json`) in the state directory."""
    from bastion.containment import MeasureStore, SharedMeasureStore
    from bastion.incidents import IncidentStore, SharedIncidentStore
    from bastion.isolation import IsolationStore, SharedIsolationStore
    from bastion.keys import KeyStore, SharedKeyStore
    from bastion.rollout import FileRolloutStates, SharedRolloutStates
    from bastion.sessions import SessionAuthority
    from bastion.tokens import TokenRevocations

    state = config.state
    shared: Records
    if state.backend == "redis":
        from bastion.records.redis import RedisRecords

        shared = RedisRecords(state.redis_url, prefix=state.redis_prefix)
    elif state.backend == "postgres":
        from bastion.records.postgres import PostgresRecords

        shared = PostgresRecords(state.postgres_dsn, table=f"{state.postgres_table}_records")
    else:
        from bastion.records.sqlite import SQLiteRecords

        local = SQLiteRecords(paths.root / "records.db")
        return RecordStores(
            KeyStore(paths.keys),
            IsolationStore(paths.isolation),
            IncidentStore(paths.incidents),
            MeasureStore(paths.measures),
            FileRolloutStates(paths.root / "rollouts.json"),
            None,
            TokenRevocations(local),
            SessionAuthority(local),
            local,
        )
    return RecordStores(
        SharedKeyStore(shared),
        SharedIsolationStore(shared),
        SharedIncidentStore(shared),
        SharedMeasureStore(shared),
        SharedRolloutStates(shared),
        shared,
        TokenRevocations(shared),
        SessionAuthority(shared),
        shared,
    )
