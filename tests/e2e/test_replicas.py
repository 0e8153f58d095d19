"""Two replicas behind one Redis, or one PostgreSQL: a principal's privacy budget and quota are spent
once, across both servers, and a server whose state server is gone refuses (503) instead of
answering unmetered, and says it is not ready. Keys, quarantines, incidents and releases are shared
too (bastion.records): a key revoked by the CLI is refused by the other replica within a second
(measured), a key quarantined by query auditing on one is refused on the other, and an operator's
release on one is served on the other."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from bastion.demo import infer_request
from tests.helpers import (
    RunningServer,
    create_key,
    run_cli,
    start_server,
    two_replicas,
    write_test_deployment,
)


@dataclass
class Replicas:
    servers: list[RunningServer]
    keys: dict[str, str]
    features: np.ndarray
    config: Path


@pytest.fixture(scope="module", params=["redis", "postgres"])
def replicas(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    root = tmp_path_factory.mktemp(f"replicas-{request.param}")
    with two_replicas(root, request.param, ("dp", "quota")) as (servers, config, build, keys):
        yield Replicas(servers, keys, build.features, config)


def test_privacy_budget_is_spent_once_across_replicas(replicas: Replicas) -> None:
    servers, keys, rows = replicas.servers, replicas.keys, replicas.features
    statuses = []
    for i in range(14):  # epsilon 0.5 a row, budget 5.0: ten answers in all, whichever replica asks
        with servers[i % 2].client(keys["dp"]) as c:
            r = c.post("/v2/models/breast-cancer/infer", json=infer_request(rows[i : i + 1]))
        statuses.append(r.status_code)
        if r.status_code == 429:
            assert r.json()["code"] == "privacy_budget_exhausted"
    assert statuses == [200] * 10 + [429] * 4


def test_replicas_with_their_redis_are_ready(replicas: Replicas) -> None:
    for server in replicas.servers:
        r = httpx.get(f"{server.base_url}/v2/health/ready")
        assert r.status_code == 200 and r.json() == {"ready": True}


def test_daily_quota_is_shared_by_replicas(replicas: Replicas) -> None:
    servers, keys, rows = replicas.servers, replicas.keys, replicas.features
    statuses = []
    for i in range(4):  # daily_quota = 2 for this role
        with servers[i % 2].client(keys["quota"]) as c:
            statuses.append(
                c.post("/v2/models/breast-cancer/infer", json=infer_request(rows[:1])).status_code
            )
    assert statuses == [200, 200, 429, 429]


@pytest.mark.parametrize(
    "state",
    [
        'backend = "redis"\nredis_url = "redis://127.0.0.1:9/0"',
        'backend = "postgres"\npostgres_dsn = "postgresql://postgres@127.0.0.1:9/x"',
    ],
    ids=["redis", "postgres"],
)
def test_a_server_without_its_state_server_refuses_with_503(tmp_path: Path, state: str) -> None:
    config, build = write_test_deployment(tmp_path)
    text = config.read_text().replace('backend = "sqlite"', state)
    config.write_text(text)
    # The keys live in the state server too: the CLI cannot create one, and says so (no traceback).
    created = run_cli("keys", "create", "--config", config, "--name", "k", "--role", "analyst", check=False)
    assert created.returncode == 1 and "shared state" in created.stderr and "Traceback" not in created.stderr
    assert created.stdout == ""
    server = start_server(config, tmp_path / "server.log")
    try:
        # Any key, known or not, is neither accepted nor refused as unknown (401): 503, nothing answered.
        key = "bst_" + "0" * 16 + "_" + "A" * 43
        with server.client(key) as c:
            r = c.post("/v2/models/breast-cancer/infer", json=infer_request(build.features[:1]))
        assert r.status_code == 503 and r.json()["code"] == "state_unavailable"
        # Readiness says so too, so that a load balancer sends the traffic to replicas that can answer.
        ready = httpx.get(f"{server.base_url}/v2/health/ready")
        assert ready.status_code == 503 and ready.json() == {"ready": False}
        assert httpx.get(f"{server.base_url}/v2/health/live").status_code == 200
        assert "Traceback" not in (tmp_path / "server.log").read_text()
    finally:
        server.stop()


METADATA = "/v2/models/breast-cancer"


def _refused_within(server: RunningServer, credential: str, status: int, limit: float = 3.0) -> float:
    """Seconds until `server` answers `credential` with `status` (polled every 20 ms)."""
    start = time.monotonic()
    with server.client(credential) as c:
        while c.get(METADATA).status_code != status:
            assert time.monotonic() - start < limit, f"still not {status} after {limit} s"
            time.sleep(0.02)
    return time.monotonic() - start


def test_a_key_revoked_by_the_cli_is_refused_by_every_replica_within_a_second(replicas: Replicas) -> None:
    a, b = replicas.servers
    key = create_key(replicas.config, "analyst")  # by the CLI, into the shared backend
    for server in (a, b):
        with server.client(key) as c:
            assert c.get(METADATA).status_code == 200  # known to both, and cached by both now
    with a.client(key) as c:
        token = c.post("/v2/auth/token", json={"ttl_seconds": 300}).json()["access_token"]
    with b.client(token) as c:
        assert c.get(METADATA).status_code == 200  # a token minted on A works on B
    run_cli("keys", "revoke", "--config", replicas.config, key.split("_")[1])
    delay = _refused_within(b, key, 401)
    assert delay < 1.0, f"replica B served a revoked key for {delay:.3f} s"
    with a.client(key) as c:
        assert c.get(METADATA).status_code == 401
    with b.client(token) as c:
        assert c.get(METADATA).status_code == 401  # the key's tokens die with it, on every replica


def test_quarantine_incident_and_release_cross_replicas(replicas: Replicas) -> None:
    a, b = replicas.servers
    thief, admin = create_key(replicas.config, "admin"), create_key(replicas.config, "admin")
    thief_id, x = thief.split("_")[1], replicas.features
    with b.client(thief) as c:
        assert c.get(METADATA).status_code == 200  # cached on B before the quarantine
    # Query auditing on A: probes around seed rows until A quarantines the key (403).
    rng = np.random.default_rng(0)
    seeds, spread = x[200:205], x.std(axis=0)
    with a.client(thief) as c:
        for i in range(200):
            row = seeds[i % len(seeds)] + 0.01 * spread * np.sign(rng.standard_normal(x.shape[1]))
            r = c.post("/v2/models/breast-cancer/infer", json=infer_request(row[None].astype(np.float32)))
            if r.status_code == 403:
                break
        else:
            raise AssertionError("replica A never quarantined the thief")
    quarantined_at = time.monotonic()
    with b.client(thief) as c:
        while (r := c.get(METADATA)).status_code != 403:
            assert time.monotonic() - quarantined_at < 1.0, "replica B still serves a quarantined key"
            time.sleep(0.02)
    assert r.json()["code"] == "key_quarantined"
    # The incident A opened is on B's admin API; B's operator releases the key, and A serves it again.
    with b.client(admin) as c:
        incidents = c.get("/v2/admin/incidents").json()["incidents"]
        assert [i["action"] for i in incidents if i["principal"] == f"key:{thief_id}"] == ["quarantine"]
        assert c.post(f"/v2/admin/keys/{thief_id}/release", json={}).status_code == 200
    assert _refused_within(a, thief, 200) < 1.0


def _deny_list(config: Path) -> list[str]:
    """The deny list's rows, as `bastion tokens revoked` prints them (header dropped)."""
    return run_cli("tokens", "revoked", "--config", config).stdout.splitlines()[1:]


def test_a_token_revoked_through_one_replica_is_refused_by_every_replica_within_a_second(
    replicas: Replicas,
) -> None:
    """Revocation of one token by its jti: through A's admin API, B refuses it within a second; the
    client sees the 401 of any bad token (no word of revocation); its siblings and its key still work."""
    a, b = replicas.servers
    key, admin = create_key(replicas.config, "analyst"), create_key(replicas.config, "admin")
    with a.client(key) as c:
        issued = c.post("/v2/auth/token", json={"ttl_seconds": 300}).json()
        sibling = c.post("/v2/auth/token", json={"ttl_seconds": 300}).json()
    token, jti = issued["access_token"], issued["jti"]
    assert len(jti) == 16 and jti != sibling["jti"] and jti not in token.split(".")[0]
    for server in (a, b):
        with server.client(token) as c:
            assert c.get(METADATA).status_code == 200  # accepted, and cached, on both
    with a.client(admin) as c:
        revoked = c.post(f"/v2/admin/tokens/{jti}/revoke", json={})
    assert revoked.status_code == 200 and revoked.json()["revoked"] is True
    delay = _refused_within(b, token, 401)
    assert delay < 1.0, f"replica B served a revoked token for {delay:.3f} s"
    with b.client(token) as c:
        refused = c.get(METADATA)
    with b.client(token[:-4] + "AAAA") as c:  # a forged signature: the same answer, word for word
        forged = c.get(METADATA)
    assert refused.status_code == forged.status_code == 401
    assert refused.json() == forged.json() and "revok" not in refused.text
    for server in (a, b):
        with server.client(sibling["access_token"]) as c:
            assert c.get(METADATA).status_code == 200
        with server.client(key) as c:
            assert c.get(METADATA).status_code == 200
    assert any(jti in row for row in _deny_list(replicas.config))
    # A's audit log names the token by its jti (issued, used, revoked), never holds the token itself.
    db = sqlite3.connect(replicas.config.parent / "state" / "audit.db")
    bodies = [b for (b,) in db.execute("SELECT body FROM records")]
    db.close()
    mine = [json.loads(b) for b in bodies if jti in b]
    assert {(r.get("target"), r.get("change")) for r in mine} >= {
        (f"token:{jti}", "issued"),
        (f"token:{jti}", "revoked"),
    }
    assert any(r.get("token") == jti and r["via"] == "token" for r in mine)
    assert not any(token.split(".")[2] in b for b in bodies)


def test_a_token_revoked_by_the_cli_and_a_keys_older_tokens_die_everywhere(replicas: Replicas) -> None:
    a, b = replicas.servers
    key = create_key(replicas.config, "analyst")
    with a.client(key) as c:
        first = c.post("/v2/auth/token", json={}).json()
        second = c.post("/v2/auth/token", json={}).json()
    with b.client(first["access_token"]) as c:
        assert c.get(METADATA).status_code == 200
    run_cli("tokens", "revoke", "--config", replicas.config, first["jti"])
    assert _refused_within(b, first["access_token"], 401) < 1.0
    assert _refused_within(a, first["access_token"], 401) < 1.0
    # Every token of the key issued before now: the second one dies too; the key mints new ones.
    time.sleep(1.0)  # `iat` is whole seconds: a token of this second would be refused with the others
    run_cli("tokens", "revoke-before", "--config", replicas.config, key.split("_")[1])
    assert _refused_within(b, second["access_token"], 401) < 1.0
    time.sleep(1.0)
    with b.client(key) as c:
        fresh = c.post("/v2/auth/token", json={}).json()
    with a.client(fresh["access_token"]) as c:
        assert c.get(METADATA).status_code == 200


def test_clients_cannot_grow_the_deny_list(replicas: Replicas) -> None:
    """Only an admin writes the deny list: a key without the admin grant, its token, an admin's token
    scoped without admin, and no credentials at all are refused, and nothing is listed."""
    a, b = replicas.servers
    analyst, admin = create_key(replicas.config, "analyst"), create_key(replicas.config, "admin")
    with a.client(analyst) as c:
        analyst_token = c.post("/v2/auth/token", json={}).json()
    with a.client(admin) as c:
        scoped = c.post("/v2/auth/token", json={"scope": ["metadata:*"]}).json()
    listed_before = _deny_list(replicas.config)
    victim = analyst_token["jti"]
    attempts = [
        (a, analyst, f"/v2/admin/tokens/{victim}/revoke", 403),
        (b, analyst, f"/v2/admin/keys/{analyst.split('_')[1]}/revoke-tokens", 403),
        (a, analyst_token["access_token"], f"/v2/admin/tokens/{scoped['jti']}/revoke", 403),
        (b, scoped["access_token"], f"/v2/admin/tokens/{victim}/revoke", 403),
        (a, None, f"/v2/admin/tokens/{victim}/revoke", 401),
        (b, "bst_" + "0" * 16 + "_" + "A" * 43, f"/v2/admin/tokens/{victim}/revoke", 401),
    ]
    for server, credential, path, status in attempts:
        with server.client(credential) as c:
            assert c.post(path, json={}).status_code == status, path
    # Malformed jtis do not reach the list either (no route: 404 after authentication).
    with a.client(admin) as c:
        assert c.post("/v2/admin/tokens/short/revoke", json={}).status_code == 404
        assert c.post("/v2/admin/tokens/" + "A" * 200 + "/revoke", json={}).status_code == 404
    assert _deny_list(replicas.config) == listed_before
    with b.client(analyst_token["access_token"]) as c:
        assert c.get(METADATA).status_code == 200


def test_a_dashboard_session_is_served_by_every_replica_and_ended_on_all(replicas: Replicas) -> None:
    """Sessions live in the shared backend: opened on A, served by B (the page with the same CSRF
    token, a CSRF-checked action); logged out on B, refused by A within a second; the key behind it
    revoked, the session is refused everywhere."""
    a, b = replicas.servers
    admin = create_key(replicas.config, "admin")
    with a.client(admin) as c:
        opened = c.post("/v2/admin/session", json={})
    assert opened.status_code == 200
    cookie, csrf = {"bastion_session": opened.cookies["bastion_session"]}, opened.json()["csrf_token"]
    with httpx.Client(base_url=b.base_url, cookies=cookie) as browser:
        assert browser.get("/v2/admin/summary").status_code == 200
        assert csrf in browser.get("/dashboard").text
        assert browser.post("/v2/admin/tokens/AAAAAAAAAAAAAAAA/revoke", json={}).status_code == 401  # no CSRF
        done = browser.post(
            "/v2/admin/tokens/AAAAAAAAAAAAAAAA/revoke", json={}, headers={"X-CSRF-Token": csrf}
        )
        assert done.status_code == 200
        assert (
            browser.post("/v2/admin/session/logout", json={}, headers={"X-CSRF-Token": csrf}).status_code
            == 200
        )
    start = time.monotonic()
    with httpx.Client(base_url=a.base_url, cookies=cookie) as browser:
        while browser.get("/v2/admin/summary").status_code != 401:
            assert time.monotonic() - start < 1.0, "replica A still serves a session logged out on B"
            time.sleep(0.02)
    # A second session; its key revoked by the CLI: refused on both.
    with b.client(admin) as c:
        second = {"bastion_session": c.post("/v2/admin/session", json={}).cookies["bastion_session"]}
    with httpx.Client(base_url=a.base_url, cookies=second) as browser:
        assert browser.get("/v2/admin/summary").status_code == 200
    run_cli("keys", "revoke", "--config", replicas.config, admin.split("_")[1])
    for server in (a, b):
        start = time.monotonic()
        with httpx.Client(base_url=server.base_url, cookies=second) as browser:
            while browser.get("/v2/admin/summary").status_code != 401:
                assert time.monotonic() - start < 1.0, "a session of a revoked key is still served"
                time.sleep(0.02)
