"""The PostgreSQL audit sink's client-side deadline, with a real PostgreSQL: a group commit whose answer
comes after the deadline (the server committed it, the answer was late) has its requests answered 503,
is never sent again, and the chain goes on from the head in the database: no fork, no gap, and the
late batch's records are in it once (an extra record of an unanswered request, never a missing one)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bastion.audit import AuditLog
from bastion.audit.log import AuditUnavailable
from bastion.audit.postgres import PostgresSink
from bastion.audit.verify import AuditSource, verify_chain
from tests.helpers import POSTGRES_DSN, drop_postgres_table, postgres_table

DEADLINE = 0.5


class LateSink(PostgresSink):
    """Commits for real, then (once, when `late` is set) answers only `delay` seconds later: the
    outcome the writer sees past its deadline is "unknown", while the server has committed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.deadline = DEADLINE
        self.late = threading.Event()
        self.interrupted = 0

    def append(self, bodies: list[dict[str, Any]], now: float, *, final: bool = False) -> list[int]:
        seqs = super().append(bodies, now, final=final)
        if self.late.is_set():
            self.late.clear()
            time.sleep(DEADLINE * 3)
        return seqs

    def interrupt(self) -> None:
        self.interrupted += 1
        super().interrupt()


@pytest.fixture
def table() -> Iterator[str]:
    name = postgres_table()
    yield name
    for suffix in ("", "_checkpoints", "_signer"):
        drop_postgres_table(name + suffix)


@pytest.mark.services
def test_a_batch_answered_after_the_deadline_is_refused_and_not_forked(table: str) -> None:
    key = Ed25519PrivateKey.generate()
    sink = LateSink(POSTGRES_DSN, key, table=table, checkpoint_every_seconds=3600)

    async def run() -> tuple[list[int], list[int]]:
        log = AuditLog(sink, retry_seconds=0.2)

        def submit(request_id: str) -> asyncio.Future[int]:
            pending = log.submit({"request_id": request_id, "status": 200}, wait=True)
            assert pending is not None
            return pending

        first = [await submit(f"a{i}") for i in range(3)]
        sink.late.set()
        started = time.monotonic()
        late = [submit(f"late{i}") for i in range(4)]
        for pending in late:
            with pytest.raises(AuditUnavailable):
                await pending
        assert time.monotonic() - started < DEADLINE + 0.3  # answered at the deadline, not at 1.5 s
        assert sink.interrupted == 1 and not log.healthy
        with pytest.raises(AuditUnavailable):  # down: refused at once
            submit("refused")
        assert not await log.reachable()
        while not log.healthy:  # the probe brings it back once the late answer has come
            assert time.monotonic() - started < 10
            await asyncio.sleep(0.05)
        after = [await submit(f"b{i}") for i in range(3)]
        log.close()
        return first, after

    first, after = asyncio.run(run())
    rows, checkpoints = AuditSource.postgres(POSTGRES_DSN, table).read()
    report = verify_chain(rows, checkpoints, key.public_key())
    assert report.records == 10  # 3 + the 4 committed late (answered 503) + 3
    assert first == [1, 2, 3] and after == [8, 9, 10]  # the late batch took 4-7 once: no fork, no gap
    bodies = [row[1] for row in rows]
    assert sum('"late' in b for b in bodies) == 4 and not any('"refused"' in b for b in bodies)
