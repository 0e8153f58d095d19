"""The shared records (bastion.records) against a real Redis and a real PostgreSQL: two stores on one
namespace stand for two replicas. What one changes the other sees within a second (measured); a
backend that is gone fails closed (StateUnavailable, never an answer); only key hashes are stored."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from bastion.containment import SharedMeasureStore
from bastion.errors import AuthenticationFailed, BadRequest, ConfigError, NotFound, StateUnavailable
from bastion.incidents import IncidentState, SharedIncidentStore
from bastion.isolation import SharedIsolationStore
from bastion.keys import SharedKeyStore
from bastion.records import CHECK_EVERY, Records
from bastion.records.postgres import PostgresRecords
from bastion.records.redis import RedisRecords
from bastion.rollout import RolloutState, SharedRolloutStates
from tests.helpers import (
    POSTGRES_DSN,
    REDIS_URL,
    drop_postgres_table,
    drop_redis_keys,
    postgres_table,
    redis_prefix,
)


@dataclass
class Backend:
    name: str
    open: Callable[..., Records]  # open(url_or_dsn=None) -> a new connection on the test's namespace
    redirect: Callable[[str], str]  # the backend's URL with its port replaced


@pytest.fixture(params=["redis", "postgres"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    opened: list[Records] = []
    if request.param == "redis":
        prefix = redis_prefix()

        def open_redis(url: str = REDIS_URL) -> Records:
            opened.append(RedisRecords(url, prefix=prefix))
            return opened[-1]

        yield Backend("redis", open_redis, lambda port: REDIS_URL.replace(":6379", f":{port}"))
        cleanup: Callable[[], None] = lambda: drop_redis_keys(prefix)  # noqa: E731
    else:
        table = postgres_table()

        def open_postgres(dsn: str = POSTGRES_DSN) -> Records:
            opened.append(PostgresRecords(dsn, table=f"{table}_records"))
            return opened[-1]

        yield Backend("postgres", open_postgres, lambda port: POSTGRES_DSN.replace(":5432", f":{port}"))
        cleanup = lambda: drop_postgres_table(table)  # noqa: E731
    for records in opened:
        records.close()
    cleanup()


def _until(check: Callable[[], bool], limit: float = 2.0) -> float:
    """Seconds until `check()` holds (polled every 10 ms); fails after `limit`."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < limit, "not seen in time"
        time.sleep(0.01)
    return time.monotonic() - start


def test_swap_is_a_compare_and_set_that_moves_the_counter(backend: Backend) -> None:
    a, b = backend.open(), backend.open()
    assert a.version("c") == 0 and a.get("c", "k") is None
    assert a.swap("c", "k", None, "1")
    assert not b.swap("c", "k", None, "2")  # already there: an insert does not overwrite
    assert not b.swap("c", "k", "stale", "2")  # not what the writer read
    assert b.swap("c", "k", "1", "2") and a.get("c", "k") == "2"
    assert a.version("c") == 2 and a.version("other") == 0
    assert not a.swap("c", "gone", "x", None)  # deleting what is not there changes nothing
    assert a.swap("c", "k", "2", None) and b.get("c", "k") is None and b.items("c") == {}
    assert b.version("c") == 3
    assert [*sorted(a.next_id("seq") for _ in range(3)), b.next_id("seq")] == [1, 2, 3, 4]


def test_swaps_from_two_replicas_race_without_losing_one(backend: Backend) -> None:
    from bastion.records import update

    stores = [backend.open(), backend.open()]

    def bump(records: Records) -> None:
        for _ in range(25):
            update(records, "c", "n", lambda cur: {"n": (cur or {"n": 0})["n"] + 1})

    threads = [threading.Thread(target=bump, args=(r,)) for r in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert json.loads(stores[0].get("c", "n") or "{}") == {"n": 50}


def test_a_key_revoked_on_one_replica_is_refused_on_the_other_within_a_second(backend: Backend) -> None:
    a, b = SharedKeyStore(backend.open()), SharedKeyStore(backend.open())
    new = a.create(name="svc", roles=["analyst"], now=time.time())
    assert b.authenticate(new.secret, now=time.time()).key_id == new.record.key_id  # cached on B now
    with pytest.raises(AuthenticationFailed):
        b.authenticate(new.secret[:-2] + "xx", now=time.time())
    assert a.revoke(new.record.key_id, now=time.time())
    assert not a.revoke(new.record.key_id, now=time.time())  # once

    def refused() -> bool:
        try:
            b.authenticate(new.secret, now=time.time())
        except AuthenticationFailed as e:
            return e.reason == "key_revoked"
        return False

    assert _until(refused) < CHECK_EVERY + 0.2
    assert [k.status(time.time()) for k in b.list()] == ["revoked"]


def test_a_quarantine_and_its_release_cross_replicas(backend: Backend) -> None:
    a, b = SharedKeyStore(backend.open()), SharedKeyStore(backend.open())
    key = a.create(name="svc", roles=["analyst"], now=time.time()).record.key_id
    assert b.get(key) is not None and b.get(key).quarantined_at is None  # type: ignore[union-attr]
    assert a.quarantine(key, now=time.time()) and not a.quarantine(key, now=time.time())
    assert _until(lambda: b.get(key).quarantined_at is not None) < CHECK_EVERY + 0.2  # type: ignore[union-attr]
    assert b.release(key) and not b.release(key)
    assert _until(lambda: a.get(key).quarantined_at is None) < CHECK_EVERY + 0.2  # type: ignore[union-attr]
    assert not a.release("0" * 16) and a.get("0" * 16) is None


def test_only_the_hash_of_a_key_is_stored(backend: Backend) -> None:
    records = backend.open()
    new = SharedKeyStore(records).create(name="svc", roles=["analyst"], now=time.time())
    stored = records.items("api_keys")
    secret_part = new.secret.rsplit("_", 1)[1]
    assert list(stored) == [new.record.key_id]
    assert secret_part not in stored[new.record.key_id] and new.secret not in stored[new.record.key_id]


def test_isolation_crosses_replicas(backend: Backend) -> None:
    a, b = SharedIsolationStore(backend.open()), SharedIsolationStore(backend.open())
    assert not b.isolated("m")
    assert a.isolate("m", now=1.0, reason="several principals") and not a.isolate("m", now=2.0, reason="x")
    assert _until(lambda: b.isolated("m")) < CHECK_EVERY + 0.2
    assert b.list() == [("m", 1.0, "several principals")]
    assert b.release("m") and not b.release("m")
    assert _until(lambda: not a.isolated("m")) < CHECK_EVERY + 0.2


def test_measures_cross_replicas(backend: Backend) -> None:
    a, b = SharedMeasureStore(backend.open()), SharedMeasureStore(backend.open())
    now = time.time()
    a.apply("key:1", "m", "throttle", value="0.5", now=now, until=now + 60)
    a.apply("key:1", "m", "degrade", value="label", now=now, until=now + 60)
    a.apply("key:1", "other", "reroute", value=None, now=now, until=now - 1)  # expired
    a.apply("key:2", "m", "reroute", value=None, now=now, until=now + 60)
    _until(lambda: bool(b.active("key:1", "m", now=now)))
    found = b.active("key:1", "m", now=now)
    assert (found.throttle_rate, found.degrade_to, found.reroute) == (0.5, "label", False)
    assert not b.active("key:1", "other", now=now)
    assert len(b.list(now=now)) == 3
    assert b.release("key:1") == 3 and b.release("key:1") == 0
    assert _until(lambda: not a.active("key:1", "m", now=now)) < CHECK_EVERY + 0.2
    assert a.active("key:2", "m", now=now).reroute


def test_incidents_are_one_lifecycle_for_every_replica(backend: Backend) -> None:
    a, b = SharedIncidentStore(backend.open()), SharedIncidentStore(backend.open())

    def opened(store: SharedIncidentStore, principal: str, action: str = "quarantine") -> int:
        return store.open(
            kind="extraction_suspected",
            model="m",
            principal=principal,
            action=action,
            detail="d",
            evidence={"queries": 3},
            request_id="r1",
            now=10.0,
        )

    first, second, third = opened(a, "key:1"), opened(b, "key:1", "alert"), opened(a, "key:2")
    assert len({first, second, third}) == 3
    shown = b.get(first)
    assert shown.state == IncidentState.CONTAINED and shown.evidence == {"queries": 3}
    assert [e.action for e in shown.events] == ["opened"]
    assert b.count_for("key:1", "m") == 2 and b.counts()["contained"] == 2 and b.counts()["open"] == 1
    assert [i.id for i in a.list(state=IncidentState.OPEN)] == [second]
    assert [i.id for i in a.list(limit=2)] == sorted([first, second, third], reverse=True)[:2]
    moved = b.transition(first, IncidentState.INVESTIGATING, actor="cli:op", now=11.0, note="looking")
    assert a.get(first).state == IncidentState.INVESTIGATING and moved.events[-1].note == "looking"
    with pytest.raises(BadRequest):
        a.transition(first, IncidentState.CONTAINED, actor="cli:op", now=12.0)  # backwards
    a.note(first, "more", actor="key:x", now=13.0)
    a.transition(first, IncidentState.CLOSED, actor="cli:op", now=14.0)
    with pytest.raises(BadRequest):
        b.note(first, "after closure", actor="cli:op", now=15.0)
    assert [e.action for e in b.get(first).events] == ["opened", "transition", "note", "transition"]
    with pytest.raises(NotFound):
        b.get(999_999)
    # A release is in the timeline of the principal's incidents not closed (the closed one stays as archived).
    assert a.record_release("key:1", actor="key:admin", now=16.0, note="key released") == (second,)
    assert [(e.action, e.actor, e.note) for e in b.get(second).events][-1] == (
        "released",
        "key:admin",
        "key released",
    )
    assert [e.action for e in b.get(first).events][-1] == "transition"
    assert b.record_release("model:m", actor="cli:op", now=17.0, note="m") == ()  # none model-wide


def test_rollout_state_crosses_replicas(backend: Backend) -> None:
    a, b = SharedRolloutStates(backend.open()), SharedRolloutStates(backend.open())
    a.save({"m": RolloutState("1", "2", 0.1, "canary")})
    assert b.load()["m"].weight == 0.1 and not b.changed()
    rolled = RolloutState("1", "2", 0.0, "rolled_back", "errors", 5.0)
    a.save({"m": rolled})
    _until(b.changed)
    assert b.load()["m"] == rolled


class _Proxy:
    """A TCP forwarder to a backend that the test can cut, as a network partition or a dead server."""

    def __init__(self, port: int) -> None:
        self._target = port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self._target))
            self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread (close alone does not)
        self._listener.close()
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


def test_a_backend_that_dies_fails_closed_even_for_a_cached_key(backend: Backend) -> None:
    proxy = _Proxy(6379 if backend.name == "redis" else 5432)
    keys = SharedKeyStore(backend.open(backend.redirect(str(proxy.port))))
    new = keys.create(name="svc", roles=["analyst"], now=time.time())
    keys.authenticate(new.secret, now=time.time())  # cached
    proxy.cut()
    time.sleep(CHECK_EVERY)
    for _ in range(3):  # refused, not answered from the cache; and fast (no wait on a dead server)
        started = time.monotonic()
        with pytest.raises(StateUnavailable):
            keys.authenticate(new.secret, now=time.time())
        assert time.monotonic() - started < 2.5


def test_an_unreachable_backend_refuses_and_never_logs_its_password(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    if backend.name == "redis":
        records: Records = RedisRecords("redis://:s3cret-pw@127.0.0.1:9/0", prefix="x:")
    else:
        records = PostgresRecords("postgresql://u:s3cret-pw@127.0.0.1:9/x", table="x_records")
    keys = SharedKeyStore(records)
    caplog.set_level(logging.DEBUG)
    for call in (
        lambda: keys.authenticate("bst_" + "0" * 16 + "_" + "a" * 43, now=0.0),
        lambda: keys.create(name="n", roles=[], now=0.0),
        lambda: SharedIsolationStore(records).isolated("m"),
    ):
        with pytest.raises(StateUnavailable) as refused:
            call()
        assert refused.value.status == 503 and "s3cret" not in str(refused.value)
    assert not records.reachable()
    assert "s3cret" not in caplog.text


def test_a_postgres_table_name_too_long_for_the_records_is_refused() -> None:
    with pytest.raises(ConfigError):
        PostgresRecords(POSTGRES_DSN, table="t" * 60)


def test_a_backend_that_hangs_costs_one_timeout_then_refuses_at_once(backend: Backend) -> None:
    silent = socket.create_server(("127.0.0.1", 0))  # accepts connections (the kernel does), never answers
    try:
        records = backend.open(backend.redirect(str(silent.getsockname()[1])))
        started = time.monotonic()
        with pytest.raises(StateUnavailable):
            records.version("api_keys")
        assert time.monotonic() - started < 3.0  # bounded: the event loop is not held for long
        started = time.monotonic()
        for _ in range(10):
            with pytest.raises(StateUnavailable):
                SharedKeyStore(records).get("0" * 16)
        assert time.monotonic() - started < 0.1  # not asked again while it was just found dead
    finally:
        silent.close()


def test_a_canary_rolled_back_on_one_replica_is_not_routed_to_on_the_other(backend: Backend) -> None:
    from bastion.config import RolloutSettings
    from bastion.rollout import Rollouts

    spec = {"m": RolloutSettings(stable="1", canary="2", canary_weight=1.0, min_requests=2, max_error_rate=0.1)}

    def replica() -> Rollouts:
        return Rollouts(
            spec, SharedRolloutStates(backend.open()), served=lambda m, v: True, clock=time.monotonic
        )

    a, b = replica(), replica()
    assert a.pick("m") == "2" and b.pick("m") == "2"
    for _ in range(2):
        tipped = a.observe(
            "m", "2", principal="key:a", routed=True, inference_seconds=0.001, rows=1, failed=True
        )
    assert tipped is not None and a.pick("m") == "1"
    assert _until(lambda: b.pick("m") == "1") < 0.5 + 0.2  # B's interval and its store's counter
    assert replica().states["m"].status == "rolled_back"  # a replica started later keeps the decision
