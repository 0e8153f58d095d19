"""The PostgreSQL audit sink behind a frozen path, from the attacker's side: a real server whose audit
PostgreSQL sits behind a relay that stops forwarding bytes but keeps every connection open (a hung
primary, a black-holed path behind a proxy; red team F1). Every waiting request must be answered 503
`audit_unavailable` within the sink's deadline (+1 s), readiness 503 within about a second, liveness
at once; service resumes when the relay does, `bastion audit verify` passes and every 200 has its
record."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from bastion.audit.log import READY_DEADLINE
from bastion.demo import infer_request
from tests.e2e.test_audit_postgres import _postgres_audit, _with_audit, table  # noqa: F401 - fixture
from tests.e2e.test_shared_state_deadlines import FreezableRelay
from tests.helpers import POSTGRES_DSN, create_key, run_cli, start_server, write_test_deployment

pytestmark = pytest.mark.slow

INFER = "/v2/models/breast-cancer/infer"
SINK_DEADLINE = 5.0  # PostgresSink's default timeout: its client-side deadline


def _timed(call: object) -> tuple[httpx.Response, float]:
    assert callable(call)
    started = time.monotonic()
    response = call()
    return response, time.monotonic() - started


def test_frozen_audit_postgres_fails_closed_within_the_deadline(tmp_path: Path, table: str) -> None:  # noqa: F811
    target = urlsplit(POSTGRES_DSN)
    relay = FreezableRelay((target.hostname or "127.0.0.1", target.port or 5432))
    dsn = POSTGRES_DSN.replace(f"{target.hostname}:{target.port or 5432}", f"127.0.0.1:{relay.port}")
    config, build = write_test_deployment(tmp_path)
    _with_audit(config, _postgres_audit(dsn, table))
    key = create_key(config, "loader")
    server = start_server(config, tmp_path / "server.log")
    body = infer_request(build.features[:1])
    answered: list[str] = []  # request ids answered 200: each must have its record

    def infer() -> httpx.Response:
        with httpx.Client(
            base_url=server.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30
        ) as c:
            r = c.post(INFER, json=body)
        if r.status_code == 200:
            answered.append(r.headers["x-request-id"])
        return r

    def ready() -> httpx.Response:
        return httpx.get(f"{server.base_url}/v2/health/ready", timeout=30)

    def live() -> httpx.Response:
        return httpx.get(f"{server.base_url}/v2/health/live", timeout=30)

    try:
        deadline = time.monotonic() + 15
        while ready().status_code != 200:
            assert time.monotonic() < deadline, "never ready"
            time.sleep(0.2)
        assert all(infer().status_code == 200 for _ in range(3))

        relay.freeze()
        with ThreadPoolExecutor(8) as pool:
            hung = [pool.submit(_timed, infer) for _ in range(8)]
            time.sleep(0.5)  # the commit is hung now, the log not yet marked down
            r, took = _timed(ready)
            assert r.status_code == 503 and took < READY_DEADLINE + 0.5, took
            r, took = _timed(live)
            assert r.status_code == 200 and took < 0.5, took
            for f in hung:
                r, took = f.result()
                assert r.status_code == 503 and r.json()["code"] == "audit_unavailable", r.text
                assert "label" not in r.text
                assert took < SINK_DEADLINE + 1.0, took
        # Down: refused at once, not ready at once, still live.
        for call, status, bound in ((infer, 503, 0.5), (ready, 503, READY_DEADLINE + 0.5), (live, 200, 0.5)):
            r, took = _timed(call)
            assert r.status_code == status and took < bound, (call, took)

        relay.thaw()
        deadline = time.monotonic() + 20
        while ready().status_code != 200:
            assert time.monotonic() < deadline, "not ready again 20 s after the relay resumed"
            time.sleep(0.2)
        assert all(infer().status_code == 200 for _ in range(3))
    finally:
        server.stop()
    log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in log and "TimeoutError" in log

    try:  # the CLI reads the chain through the (thawed) relay the config names
        verify = run_cli("audit", "verify", "--config", config, check=False)
        export = run_cli("audit", "export", "--config", config).stdout
    finally:
        relay.close()
    assert verify.returncode == 0, verify.stderr
    records = [json.loads(line) for line in export.splitlines()]
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))  # no fork, no gap
    ok = {str(r["request_id"]) for r in records if r.get("route") == "infer" and r.get("status") == 200}
    assert len(answered) == 6 and set(answered) <= ok  # every 200 has its record
