"""Writers for the multi-writer tests, in a module light enough for a spawned process to import
(no test helpers, no models): each appends records in waves and reports its sequence numbers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bastion.audit import AuditLog, AuditSink, SQLiteSink
from bastion.audit.postgres import PostgresSink

WAVE = 5  # records submitted together: batches of several, interleaved with the other writers'


async def _write(log: AuditLog, writer: int, n: int) -> list[int]:
    seqs: list[int] = []
    for start in range(0, n, WAVE):
        futures = [
            log.submit({"writer": writer, "i": i}, wait=True) for i in range(start, min(n, start + WAVE))
        ]
        seqs += await asyncio.gather(*(f for f in futures if f is not None))
    return seqs


def run_writer(make: Callable[[], AuditSink], writer: int, n: int, start: Any) -> list[int]:
    """`start`: a barrier every writer waits at once its sink is open, so that they write together."""

    async def run() -> list[int]:
        log = AuditLog(make())
        start.wait()
        try:
            return await _write(log, writer, n)
        finally:
            log.close()

    return asyncio.run(run())


def process_writer(
    kind: str, where: str, dsn: str, pem: bytes, writer: int, n: int, start: Any, queue: Any
) -> None:
    key = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(key, Ed25519PrivateKey)

    def make() -> AuditSink:
        if kind == "sqlite":
            return SQLiteSink(Path(where), key, checkpoint_every_records=7)
        return PostgresSink(dsn, key, table=where, checkpoint_every_records=7)

    queue.put(run_writer(make, writer, n, start))
