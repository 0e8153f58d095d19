"""`AuditSource`: the chain the policy file names (SQLite or PostgreSQL), and the lookup of a
request's record that `bastion incidents export` uses."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bastion.audit import AuditSink, SQLiteSink
from bastion.audit.postgres import PostgresSink
from bastion.audit.verify import AuditSource
from bastion.config import AuditSettings
from bastion.statedir import StatePaths
from tests.helpers import POSTGRES_DSN, drop_postgres_table, free_port, postgres_table


@pytest.fixture
def table() -> Iterator[str]:
    name = postgres_table()
    yield name
    for suffix in ("", "_checkpoints", "_signer"):
        drop_postgres_table(name + suffix)


def _fill(sink: AuditSink) -> None:
    bodies: list[dict[str, object]] = [{"request_id": f"req-{i}", "note": "req-7 mentioned"} for i in range(10)]
    # Operators' changes (the incident export lists them): one to incident 1, one to incident 10, a
    # release of a key, and a record that only mentions the target in another field.
    bodies[2] |= {"route": "incident_transition", "target": "incident:1", "change": "state=investigating"}
    bodies[3] |= {"route": "incident_note", "target": "incident:10", "change": "note"}
    bodies[4] |= {"route": "key_release", "target": "key:0123456789abcdef", "change": "released", "via": "cli"}
    bodies[5] |= {"note": '"target":"incident:1"'}
    assert sink.append(bodies, 1000.0, final=True) == list(range(1, 11))
    sink.close()


@pytest.mark.services
def test_the_configured_source_and_a_request_lookup(tmp_path: Path, table: str) -> None:
    key = Ed25519PrivateKey.generate()
    paths = StatePaths(tmp_path)
    _fill(SQLiteSink(paths.audit, key))
    _fill(PostgresSink(POSTGRES_DSN, key, table=table))
    settings = AuditSettings(sink="postgres", postgres_dsn=POSTGRES_DSN, postgres_table=table)
    for source in (AuditSource.configured(AuditSettings(), paths), AuditSource.configured(settings, paths)):
        # Its own record, not one whose other fields merely mention the id.
        assert source.find_request("req-7") == 8
        assert source.find_request("req-70") is None
        assert len(source.read()[0]) == 10
        changes = source.find_changes({"incident:1", "key:0123456789abcdef"})
        assert changes is not None
        assert [(c["seq"], c["route"], c["change"]) for c in changes] == [
            (3, "incident_transition", "state=investigating"),
            (5, "key_release", "released"),
        ]
        assert source.find_changes({"incident:%"}) == []  # LIKE's wildcards are text here
    assert AuditSource.configured(settings, paths).name == f"postgresql table {table}"  # never the DSN


def test_a_store_that_cannot_be_read_finds_nothing(tmp_path: Path) -> None:
    assert AuditSource.sqlite(tmp_path / "missing.db").find_request("r") is None
    refused = AuditSource.postgres(f"postgresql://postgres@127.0.0.1:{free_port()}/x", "bastion_audit")
    assert refused.find_request("r") is None
    assert refused.find_changes({"incident:1"}) is None
