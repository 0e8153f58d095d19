"""Runs after the other end-to-end tests (file order): every request they made is in the audit log,
the chain verifies, a tampered copy does not, and no secret or raw input reached any log."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from bastion.demo import infer_request
from tests.conftest import Deployment
from tests.helpers import run_cli


def _audit_db(dep: Deployment) -> Path:
    return dep.root / "state" / "audit.db"


def _snapshot(dep: Deployment, dest: Path) -> Path:
    """A consistent copy of the live database (WAL included), made through SQLite's backup API."""
    src = sqlite3.connect(_audit_db(dep))
    dst = sqlite3.connect(dest)
    src.backup(dst)
    src.close()
    dst.close()
    return dest


# Audit records that are not a request's: model loads, incidents, drift alerts and clears, breaker and rollout events.
_EVENTS = ("model_load", "incident", "drift", "breaker", "rollout")


def test_every_request_is_in_the_audit_log(deployment: Deployment) -> None:
    ids = set(deployment.server.request_ids)
    assert len(ids) > 50  # the rest of the suite ran first
    conn = sqlite3.connect(_audit_db(deployment))
    records = [json.loads(b) for (b,) in conn.execute("SELECT body FROM records")]
    conn.close()
    loads = [r for r in records if r["route"] == "model_load"]
    assert {(r["model"], r["decision"], r["reason"]) for r in loads} == {
        ("breast-cancer", "allow", "verified"),
        ("breast-cancer-skops", "allow", "verified"),
        ("diabetes", "allow", "verified"),
        ("loan", "allow", "verified"),
    }
    assert all(r["digest"].startswith("sha256:") for r in loads)
    bodies = [r for r in records if r["route"] not in _EVENTS]  # not requests
    recorded = {b["request_id"] for b in bodies}
    assert ids <= recorded, f"missing from the audit log: {sorted(ids - recorded)[:5]}"
    by_status = {b["status"] for b in bodies}
    assert {200, 400, 401, 403, 404, 405, 413, 422, 429} <= by_status
    denied = [b for b in bodies if b["status"] == 401]
    assert all(b["decision"] == "deny" and b["reason"] for b in denied)
    # Operators see why authentication failed; clients only ever saw "unauthenticated".
    assert {"key_revoked", "key_expired", "token_bad_signature", "missing_credentials"} <= {
        b["reason"] for b in denied
    }
    allowed = [b for b in bodies if b["route"] == "infer" and b["status"] == 200]
    assert all(b["digest"].startswith("sha256:") and len(b["payload_hmac"]) == 64 for b in allowed)
    assert all(b["principal"].startswith("key:") for b in allowed)


def test_audit_verify_passes_on_the_live_log(deployment: Deployment) -> None:
    out = run_cli("audit", "verify", "--config", deployment.config)
    assert out.stdout.startswith("OK:"), out.stdout


def _verify_copy(dep: Deployment, db: Path) -> tuple[int, str]:
    pub = dep.root / "state" / "audit_signing.pub"
    r = run_cli("audit", "verify", "--db", db, "--public-key", pub, check=False)
    return r.returncode, r.stderr


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        (
            "UPDATE records SET body = replace(body, '\"status\":401', '\"status\":200') WHERE seq = "
            "(SELECT min(seq) FROM records WHERE body LIKE '%\"status\":401%')",
            "edited",
        ),
        ("DELETE FROM records WHERE seq = 5", "record 5: deleted"),
        (
            "UPDATE records SET seq = CASE seq WHEN 7 THEN -8 WHEN 8 THEN -7 END WHERE seq IN (7, 8); "
            "UPDATE records SET seq = -seq WHERE seq < 0",
            "record 7: reordered",
        ),
        ("DELETE FROM records WHERE seq = (SELECT max(seq) FROM records)", "deleted"),
    ],
    ids=["edit", "delete", "swap", "truncate"],
)
def test_audit_verify_names_the_tampered_record(
    deployment: Deployment, tmp_path: Path, tamper: str, expected: str
) -> None:
    # Make sure the last record is covered by a checkpoint, as after a clean shutdown.
    db = _snapshot(deployment, tmp_path / "audit.db")
    code, _ = _verify_copy(deployment, db)
    assert code == 0
    conn = sqlite3.connect(db)
    if "max(seq)" in tamper:  # truncation is caught by the checkpoint that covered the lost record
        last = conn.execute("SELECT max(seq) FROM checkpoints").fetchone()[0]
        assert last is not None
        conn.execute("DELETE FROM records WHERE seq >= ?", (last,))
    else:
        conn.executescript(tamper)
    conn.commit()
    conn.close()
    code, message = _verify_copy(deployment, db)
    assert code != 0
    assert expected in message, message


def test_audit_export_writes_json_lines(deployment: Deployment, tmp_path: Path) -> None:
    out = tmp_path / "audit.jsonl"
    run_cli("audit", "export", "--config", deployment.config, "-o", out)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines and lines[0]["seq"] == 1 and len(lines[0]["hash"]) == 64
    assert all("payload_hmac" in r for r in lines if r["route"] not in ("model_load", "drift", "breaker", "rollout"))
    assert lines[0]["route"] == "model_load"  # start-up verification comes first


def test_no_secret_or_raw_input_in_any_log(deployment: Deployment, tmp_path: Path) -> None:
    # A little more traffic carrying distinctive raw values.
    marker_row = [123.456789 + i for i in range(30)]
    body = infer_request(__import__("numpy").asarray([marker_row], dtype="float32"))
    with deployment.server.client(deployment.keys["admin"]) as c:
        c.post("/v2/models/breast-cancer/infer", json=body)
    deployment.server.stop()  # flush everything: final checkpoint, logs closed
    needles = {s for s in deployment.secrets if len(s) > 20}
    needles |= {s.split("_", 2)[2] for s in deployment.keys.values()}  # the secret part alone
    needles |= {"123.456", "124.456", "152.456"} | {v for v in deployment.raw_values if len(v) >= 8}
    assert len(needles) > 20
    state = deployment.root / "state"
    haystacks = {
        p: p.read_bytes() for p in [deployment.server.log_path, *state.glob("audit.db*")] if p.exists()
    }
    export = tmp_path / "export.jsonl"
    run_cli("audit", "export", "--config", deployment.config, "-o", export)
    haystacks[export] = export.read_bytes()
    keys_db = tmp_path / "keys.db"
    shutil.copy(state / "keys.db", keys_db)
    haystacks[keys_db] = keys_db.read_bytes()  # keys are stored hashed only
    for path, data in haystacks.items():
        for needle in needles:
            assert needle.encode() not in data, f"{needle[:12]}... found in {path.name}"
    # And the chain still verifies after a clean shutdown (final checkpoint written).
    assert run_cli("audit", "verify", "--config", deployment.config).returncode == 0
