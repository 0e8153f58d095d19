"""Anonymous floods, from the attacker's side: every request refused before identity (no credentials,
a wrong scheme, a malformed or unknown key, a garbage token, an unknown route, a wrong method, the
token route with a bad key) draws on one bucket per client address; past it the address gets 429
without its credential being checked and without an audit record of its own, and the audit log
keeps the count in one summary record per address and window. A valid key from another address is
served throughout. Addresses are real: the attacker's sockets are bound to other loopback addresses.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from bastion.demo import infer_request
from tests.helpers import RunningServer, create_key, run_cli, start_server, write_test_deployment

BURST = 7
AUDITED = 3
MAX_ADDRESSES = 4
FAILED_AUTH = (
    f"failed_auth_rate = 0.01\nfailed_auth_burst = {BURST}\nfailed_auth_max_addresses = {MAX_ADDRESSES}\n"
    f"refusals_audited_per_window = {AUDITED}\nrefusal_window_seconds = 3600\n"
)
ATTACKER = "127.0.0.2"
UNKNOWN_KEY = "bst_" + "0" * 16 + "_" + "a" * 43
# One member of each kind of request refused before identity.
PROBES: list[tuple[str, str, dict[str, str]]] = [
    ("GET", "/v2/models/breast-cancer", {}),
    ("GET", "/v2/models/breast-cancer", {"Authorization": "Basic dXNlcjpwdw=="}),
    ("GET", "/v2/models/breast-cancer", {"Authorization": "Bearer"}),
    ("POST", "/v2/models/breast-cancer/infer", {"Authorization": "Bearer bst_nonsense"}),
    ("POST", "/v2/models/breast-cancer/infer", {"Authorization": f"Bearer {UNKNOWN_KEY}"}),
    ("GET", "/v2", {"Authorization": "Bearer eyJhbGciOiJub25lIn0.e30."}),
    ("GET", "/v2/no/such/route", {}),
    ("DELETE", "/v2/models/breast-cancer", {}),
    ("POST", "/v2/auth/token", {"Authorization": f"Bearer {UNKNOWN_KEY}"}),
]


@dataclass
class Flooded:
    server: RunningServer
    config: Path
    root: Path
    analyst: str
    admin: str
    body: dict[str, Any]


@pytest.fixture(scope="module")
def flooded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flooded]:
    root = tmp_path_factory.mktemp("auth-flood")
    config, build = write_test_deployment(root, failed_auth=FAILED_AUTH)
    analyst, admin = create_key(config, "analyst"), create_key(config, "admin")
    server = start_server(config, root / "server.log")
    yield Flooded(server, config, root, analyst, admin, infer_request(build.features[:1]))
    server.stop()


def client_from(server: RunningServer, address: str, key: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    transport = httpx.HTTPTransport(local_address=address)
    return httpx.Client(base_url=server.base_url, headers=headers, transport=transport, timeout=30)


def records(root: Path) -> list[dict[str, Any]]:
    conn = sqlite3.connect(root / "state" / "audit.db")
    try:
        return [json.loads(b) for (b,) in conn.execute("SELECT body FROM records ORDER BY seq")]
    finally:
        conn.close()


def test_every_kind_of_refusal_before_identity_draws_on_one_bucket_per_address(flooded: Flooded) -> None:
    server = flooded.server
    before = len(records(flooded.root))
    with client_from(server, ATTACKER) as attacker, client_from(server, "127.0.0.1", flooded.analyst) as good:
        first = [attacker.request(m, p, headers=h).status_code for m, p, h in PROBES[:BURST]]
        assert first == [401] * BURST
        for _ in range(20):  # past the bucket: every kind is refused unchecked, a valid key's too
            for method, path, headers in PROBES:
                r = attacker.request(method, path, headers=headers)
                assert r.status_code == 429, (method, path, r.text)
                assert r.json() == {
                    "error": "too many failed authentications from this address",
                    "code": "auth_throttled",
                }
                assert int(r.headers["Retry-After"]) >= 1
        throttled = attacker.get(
            "/v2/models/breast-cancer", headers={"Authorization": f"Bearer {flooded.analyst}"}
        )
        assert throttled.status_code == 429  # sharing an address with an attacker shares its penalty
        # Meanwhile a valid key from another address is served.
        assert good.post("/v2/models/breast-cancer/infer", json=flooded.body).status_code == 200
    # 7 + 181 refusals cost the audit log 3 records while the window is open (and one summary later).
    written = [r for r in records(flooded.root)[before:] if r.get("client") == ATTACKER]
    assert len(written) == AUDITED
    assert all(r["decision"] == "deny" and r["status"] == 401 for r in written)


def test_metrics_count_throttled_failures_without_naming_addresses(flooded: Flooded) -> None:
    with client_from(flooded.server, "127.0.0.1", flooded.admin) as admin:
        text = admin.get("/metrics").text
    assert 'bastion_rate_limited_total{code="auth_throttled"} 181.0' in text
    assert "bastion_refusals_counted_total 185.0" in text  # 188 refusals, 3 recorded one by one
    assert "bastion_failed_auth_addresses 1.0" in text
    assert ATTACKER not in text and "127.0.0.1" not in text


def test_many_addresses_fill_the_table_and_then_share_one_bucket(flooded: Flooded) -> None:
    server = flooded.server
    statuses: list[int] = []
    for i in range(1, 21):
        with client_from(server, f"127.0.1.{i}") as attacker:
            statuses += [attacker.get("/v2/models/breast-cancer").status_code for _ in range(BURST + 1)]
    # Three more addresses fit the table (one is the first test's attacker); the rest share one bucket.
    assert statuses.count(401) == (MAX_ADDRESSES - 1) * BURST + BURST
    assert statuses.count(429) == len(statuses) - statuses.count(401)
    # The table is full of buckets not yet refilled: a new address is refused, valid key or not (fail
    # towards throttling: an attacker with many addresses must not get unlimited attempts).
    with client_from(server, "127.0.2.1", flooded.analyst) as newcomer:
        assert newcomer.get("/v2/models/breast-cancer").status_code == 429


def test_the_audit_keeps_account_of_every_refusal(flooded: Flooded) -> None:
    flooded.server.stop()  # the open window's summaries are written at shutdown
    summaries = {r["client"]: r for r in records(flooded.root) if r["route"] == "refused_before_identity"}
    attacker = summaries[ATTACKER]
    assert attacker["count"] == 185 and attacker["recorded_individually"] == AUDITED
    assert attacker["reasons"]["throttled"] == 181
    assert sum(attacker["reasons"].values()) == 185
    overflow = summaries["(untracked addresses)"]
    individual = [
        r
        for r in records(flooded.root)
        if r["route"] != "refused_before_identity" and (r.get("client") or "").startswith("127.0.1.")
    ]
    assert (
        overflow["count"]
        + len(individual)
        + sum(summaries[c]["count"] for c in summaries if c.startswith("127.0.1."))
        == 20 * (BURST + 1) + 1
    )
    out = run_cli("audit", "verify", "--config", flooded.config)
    assert out.stdout.startswith("OK:"), out.stdout
