"""A valid key flooding past its rate limit, from its side (red team of issue #9, F11).

Each 429 `rate_limited` was an audit record of its own, committed and fsynced before the answer: a
label-only key sending as fast as it could grew the audit log by ~600 bytes a refused request, at
disk speed (3,000 requests: 1.7 MB). Now, per principal and window, the first refusals past a limit
are recorded one by one and the rest counted into one summary record, as failed authentication is
per address: nothing goes unrecorded, nothing grows at the flood's pace.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import httpx

from tests.helpers import create_key, start_server, write_test_deployment

AUDITED = 4
SETTINGS = f"refusals_audited_per_window = {AUDITED}\nrefusal_window_seconds = 3600\n"


def _records(root: Path) -> list[dict[str, object]]:
    conn = sqlite3.connect(root / "state" / "audit.db")
    try:
        return [json.loads(b) for (b,) in conn.execute("SELECT body FROM records ORDER BY seq")]
    finally:
        conn.close()


def test_a_key_flooding_past_its_rate_limit_is_counted_not_recorded_per_request(tmp_path: Path) -> None:
    config, _ = write_test_deployment(tmp_path, failed_auth=SETTINGS)
    key = create_key(config, "tight")  # rate 0.5/s, burst 3
    principal = "key:" + key.split("_")[1]
    server = start_server(config, tmp_path / "server.log")
    try:
        with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {key}"}) as c:
            statuses = [c.get("/v2/models/breast-cancer").status_code for _ in range(200)]
        assert statuses.count(429) >= 190
        refused = statuses.count(429)
        during = [
            r for r in _records(tmp_path) if r.get("principal") == principal and r["reason"] == "rate_limited"
        ]
        assert len(during) == AUDITED
    finally:
        server.stop()  # writes the summaries of windows still open
    records = _records(tmp_path)
    summaries = [r for r in records if r["route"] == "refused_over_limit"]
    assert len(summaries) == 1
    summary = summaries[0]
    assert summary["principal"] == principal and summary["reason"] == "refusals_counted"
    assert summary["count"] == refused - AUDITED and summary["reasons"] == {"rate_limited": refused - AUDITED}
    assert summary["recorded_individually"] == AUDITED
