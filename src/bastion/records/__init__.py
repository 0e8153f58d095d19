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

Fail closed, within a deadline. A backend that cannot be reached raises `StateUnavailable` (503
`state_unavailable`): authentication cannot succeed, nothing is answered. The stores are called
from the event loop, so every call to Redis or PostgreSQL goes through a `Guard`: it runs on a
worker thread and the caller waits at most `DEADLINE` seconds (a hung server, a frozen proxy, a
table lock held by another session), after which the call is abandoned (its connection closed when
it returns) and the backend is marked down. While it is down every call fails at once, without
touching the network, and a background thread probes it every `PROBE_EVERY` seconds with the same
read the requests make; the first answer puts it back in service. So a hung backend holds the
event loop once per outage, for at most `DEADLINE`, and liveness never waits on it. Server-side
bounds back this up (PostgreSQL `statement_timeout` and `lock_timeout` per connection, Redis socket
timeouts), so an abandoned call ends too. Connection strings are never logged: only the setting's
name, host:port and the error's type (`Guard.source`).

`open_records(config, paths)` is the one place that chooses: SQLite files in the state directory
for `state.backend = "sqlite"` or `"memory"`, else the shared backend. Token revocations and
dashboard sessions are written only over `Records`: with SQLite they use a third implementation,
`bastion.records.sqlite` (`records.db` in the state directory). The server and the CLI both
call it; it lives here, not in `bastion.assembly`, because importing the assembly (every stage,
the language-model code) costs the CLI ~1.2 s per command.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import urlsplit

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
# The longest a caller (the event loop) waits for one call to Redis or PostgreSQL. A local round trip
# takes well under a millisecond and a swap's commit a few; 0.3 s leaves room for a loaded host while
# keeping liveness (answered on the same loop, which a call holds once per outage) well under 0.5 s.
DEADLINE = 0.3
FIRST_DEADLINE = 3.0  # the same for a process's first call, which connects (and creates the tables)
PROBE_EVERY = 0.2  # seconds between probes of a backend marked down (requests fail at once meanwhile)
_WORKERS = 4  # threads per backend: calls abandoned on a hung backend occupy at most this many
_IDLE_EXIT = 60.0  # seconds a worker thread waits for a call before it exits (started again on demand)
_SWAP_ATTEMPTS = 64
T = TypeVar("T")


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


_REFUSAL = "shared state (keys, containment) unavailable; nothing was answered"


def unavailable(error: Exception, source: str = "") -> StateUnavailable:
    """Log the failure (the setting and host:port when given, the error's type: never the URL, which
    may hold a password) and return the 503 to raise."""
    where = f" ({source})" if source else ""
    log.error("shared state unavailable%s: %s", where, type(error).__name__)
    return StateUnavailable(_REFUSAL, source=source)


def target(url: str) -> str:
    """`host:port` of a Redis URL or PostgreSQL DSN (URL form), for messages: never the user or password."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname or "localhost", parts.port
    except ValueError:
        return "?"
    if parts.scheme == "unix":
        return parts.path or "?"
    default = 6379 if parts.scheme.startswith("redis") else 5432
    return f"{host}:{port or default}"


class Abandoned:
    """Handed to a guarded call: `abandoned` turns true when its caller stopped waiting (the call's
    connection must then be closed, not reused)."""

    __slots__ = ("abandoned",)

    def __init__(self) -> None:
        self.abandoned = False


class Guard:
    """Every call to one shared backend: on a worker thread, waited for at most `deadline` seconds.

    `source` names the setting and host:port (`"state.postgres_dsn, 127.0.0.1:5432"`) for logs and the
    CLI. `errors` are the client library's exceptions that mean "not available". `probe()` (raises one
    of `errors`, or returns) is run by a background thread while the backend is marked down; its
    success marks it up again. Thread-safe.
    """

    def __init__(
        self,
        source: str,
        errors: tuple[type[Exception], ...],
        probe: Callable[[], object],
        *,
        deadline: float = DEADLINE,
        first_deadline: float = FIRST_DEADLINE,
    ) -> None:
        self.source = source
        self._errors = errors
        self._probe = probe
        self._deadline = deadline
        # Until one call has succeeded (start-up, a CLI command) the first connection is made within
        # the call: connecting and creating tables may take longer than a round trip.
        self._first_deadline = first_deadline
        self._warm = False
        # Daemon threads, not a ThreadPoolExecutor: a call stuck on a frozen connection must not keep
        # the process from exiting (the executor's threads are joined at exit).
        self._jobs: queue.SimpleQueue[tuple[Callable[[Abandoned], Any], Abandoned, Future[Any]]] = queue.SimpleQueue()
        self._workers = 0
        self._lock = threading.Lock()
        self._down = False
        self._prober: threading.Thread | None = None
        self._closed = False

    @property
    def down(self) -> bool:
        """Marked down: calls fail at once until a probe succeeds."""
        return self._down

    def run(self, work: Callable[[Abandoned], T]) -> T:
        """`work(ticket)` on a worker thread; its result, or StateUnavailable (503) when the backend is
        down, failed, or did not answer within the deadline."""
        if self._down:
            raise StateUnavailable(_REFUSAL, source=self.source)
        self._closed = False
        ticket = Abandoned()
        future: Future[T] = Future()
        self._jobs.put((work, ticket, future))
        if self._workers < _WORKERS:  # after the put: a worker that exits meanwhile sees the job
            self._start_workers()
        deadline = self._deadline if self._warm else self._first_deadline
        try:
            result = future.result(timeout=deadline)
        except concurrent.futures.TimeoutError:
            ticket.abandoned = True
            future.cancel()  # still queued behind abandoned calls: never started
            raise self.failed(TimeoutError(f"no answer within {deadline} s")) from None
        except self._errors as e:
            raise self.failed(e) from None
        self._warm = True
        return result

    def _start_workers(self) -> None:
        with self._lock:
            while self._workers < _WORKERS:
                threading.Thread(target=self._work, name="bastion-records", daemon=True).start()
                self._workers += 1

    def _work(self) -> None:
        while True:
            try:
                work, ticket, future = self._jobs.get(timeout=_IDLE_EXIT)
            except queue.Empty:
                with self._lock:  # idle: exit, unless a job arrived since (it would wait for nobody)
                    if self._jobs.empty():
                        self._workers -= 1
                        return
                continue
            if not future.set_running_or_notify_cancel():
                continue  # its caller gave up before it started
            try:
                future.set_result(work(ticket))
            except BaseException as e:  # handed to the caller, who re-raises it
                future.set_exception(e)

    def failed(self, error: Exception) -> StateUnavailable:
        """Mark the backend down (a background probe will bring it back) and return the 503 to raise."""
        with self._lock:
            self._down = True
            if (self._prober is None or not self._prober.is_alive()) and not self._closed:
                self._prober = threading.Thread(target=self._probing, name="bastion-records-probe", daemon=True)
                self._prober.start()
        return unavailable(error, self.source)

    def _probing(self) -> None:
        while not self._closed:
            time.sleep(PROBE_EVERY)
            try:
                self._probe()
            except Exception:  # noqa: S112 - any failure: still down, probe again
                continue
            with self._lock:
                self._down = False
                self._warm = True  # the probe's connection is pooled: later calls get the short deadline
                self._prober = None
            log.warning("shared state available again (%s)", self.source)
            return

    def close(self) -> None:
        """Stop probing (a later call starts again). The idle worker threads stay (daemons)."""
        self._closed = True


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

        shared = RedisRecords(
            state.redis_url, prefix=state.redis_prefix, source=f"state.redis_url, {target(state.redis_url)}"
        )
    elif state.backend == "postgres":
        from bastion.records.postgres import PostgresRecords

        shared = PostgresRecords(
            state.postgres_dsn,
            table=f"{state.postgres_table}_records",
            source=f"state.postgres_dsn, {target(state.postgres_dsn)}",
        )
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


def check_backends(config: Config, timeout: float = 3.0) -> list[tuple[str, str, str | None]]:
    """Try every shared backend the configuration names (`bastion check`): one connection and one
    round trip each, within `timeout` seconds. [(setting, host:port, None if it answered, else the
    error's type and first line, the password removed)]."""
    checks: list[tuple[str, str]] = []
    if config.state.backend == "redis":
        checks.append(("state.redis_url", config.state.redis_url))
    elif config.state.backend == "postgres":
        checks.append(("state.postgres_dsn", config.state.postgres_dsn))
    if config.audit.sink == "postgres":
        checks.append(("audit.postgres_dsn", config.audit.postgres_dsn))
    return [(setting, target(url), _try(url, timeout)) for setting, url in checks]


def _try(url: str, timeout: float) -> str | None:
    secret = None
    try:
        secret = urlsplit(url).password
        if url.startswith(("redis", "unix")):
            import redis

            with redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout) as client:
                client.ping()
        else:
            import psycopg

            with psycopg.connect(url, connect_timeout=max(1, int(timeout))) as conn:
                conn.execute("SELECT 1")
    except Exception as e:  # any failure is the answer (reported, not raised)
        lines = str(e).strip().splitlines()
        text = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
        return text.replace(secret, "***") if secret else text
    return None
