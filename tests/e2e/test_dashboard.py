"""The dashboard end to end, in headless Chromium (Debian's `chromium`, driven by Playwright).

A real `bastion serve`, a scripted extraction attack that gets a key quarantined and opens an
incident; then in the browser an admin signs in, sees the traffic and the incident, acknowledges
it and releases the key; the audit log holds each step. From the attacker's side: a non-admin key
can neither load the dashboard's data nor call its actions nor open a session; a POST with the
session cookie and without the CSRF token is refused, from the page itself and from a cross-site
form; a cookie is useless after logout and on another deployment (it outlives a restart of its own:
sessions live in the deployment's store). Screenshots go to artifacts/dashboard/.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.test_extraction import _probe_until_quarantined
from tests.helpers import RunningServer, create_key, start_server, write_test_deployment

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"  # Debian's (scripts/ensure-chromium); never Playwright's downloads
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "dashboard"


def _artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    ignore = ARTIFACTS.parent / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# CI artifacts (screenshots), never committed\n*\n")
    return ARTIFACTS


def _audit(root: Path) -> list[dict[str, Any]]:
    db = sqlite3.connect(root / "state" / "audit.db")
    records = [json.loads(b) for (b,) in db.execute("SELECT body FROM records ORDER BY rowid")]
    db.close()
    return records


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    if shutil.which(CHROMIUM) is None:
        # Not a skip: the dashboard is a feature, and `make test` installs chromium first.
        raise AssertionError(f"{CHROMIUM} is missing: run scripts/ensure-chromium")
    root = tmp_path_factory.mktemp("dashboard")
    config, build = write_test_deployment(root)
    keys = {
        "operator": create_key(config, "admin"),
        "thief": create_key(config, "analyst"),
        "analyst": create_key(config, "analyst"),
    }
    server = start_server(config, root / "server.log")
    state: dict[str, Any] = {"root": root, "config": config, "build": build, "keys": keys, "server": server}
    yield state
    state["server"].stop()


def test_an_admin_handles_an_extraction_incident_in_the_browser(site: dict[str, Any]) -> None:
    from playwright.sync_api import expect, sync_playwright

    server: RunningServer = site["server"]
    keys = site["keys"]
    thief_id = keys["thief"].split("_")[1]
    out = _artifacts()

    # 1. The attack: Jacobian-style probing until the thief's key is quarantined with an incident.
    assert _probe_until_quarantined(server, keys["thief"], site["build"].features, seed=0) <= 40
    with httpx.Client(base_url=server.base_url) as anonymous:
        assert (
            anonymous.get("/v2/models/breast-cancer", headers={"Authorization": "Bearer nope"}).status_code
            == 401
        )
    with server.client(keys["operator"]) as operator:
        (incident,) = [
            i
            for i in operator.get("/v2/admin/incidents").json()["incidents"]
            if i["principal"] == f"key:{thief_id}"
        ]
    assert incident["state"] == "contained"

    # 2. A non-admin key: no session, no dashboard, no data, no action.
    with server.client(keys["analyst"]) as analyst:
        for method, path, body in [
            ("POST", "/v2/admin/session", {}),
            ("GET", "/dashboard", None),
            ("GET", "/v2/admin/summary", None),
            ("GET", "/v2/admin/incidents", None),
            ("POST", f"/v2/admin/incidents/{incident['id']}/transition", {"state": "investigating"}),
            ("POST", f"/v2/admin/keys/{thief_id}/release", {}),
        ]:
            refused = analyst.request(method, path, json=body)
            assert refused.status_code == 403, (method, path, refused.text)
            assert "set-cookie" not in refused.headers
    with httpx.Client(base_url=server.base_url) as anonymous:
        assert anonymous.get("/v2/admin/summary").status_code == 401
        assert anonymous.get("/dashboard").status_code == 401
        # A browser's navigation is sent to the login page instead (its session ended or expired).
        navigation = anonymous.get("/dashboard", headers={"Accept": "text/html,application/xhtml+xml"})
        assert (navigation.status_code, navigation.headers["location"]) == (303, "/dashboard/login")

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        problems: list[str] = []
        page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
        page.on("pageerror", lambda e: problems.append(str(e)))

        # 3. Sign in: a wrong key first, then the admin's.
        page.goto(f"{server.base_url}/dashboard/login")
        page.fill("#api-key", keys["analyst"])
        page.click("#login-button")
        expect(page.locator("#login-message")).to_contain_text("not granted the admin role")
        page.screenshot(path=str(out / "01-login-refused.png"))
        page.fill("#api-key", keys["operator"])
        page.click("#login-button")
        page.wait_for_url(f"{server.base_url}/dashboard")
        (cookie,) = context.cookies()
        assert cookie["name"] == "bastion_session" and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert cookie["path"] == "/" and not cookie["secure"]  # plain HTTP here: Secure only over TLS
        assert 0 < cookie["expires"] - page.evaluate("Date.now() / 1000") <= 1800 + 5
        assert page.evaluate("document.cookie") == ""  # HttpOnly: the page's script cannot read it

        # 4. The traffic and the incident are on the page.
        incident_row = page.locator("#incidents tbody tr", has_text=f"key:{thief_id}")
        expect(incident_row).to_contain_text("contained")
        expect(incident_row).to_contain_text("extraction_suspected")
        expect(page.locator("#quarantined tbody tr", has_text=thief_id)).to_be_visible()
        expect(page.locator("#traffic-routes")).to_contain_text("infer")
        expect(page.locator("#denials")).to_contain_text("403")
        expect(page.locator("#denials")).to_contain_text("key_quarantined")  # the stable code
        expect(page.locator("#denials")).to_contain_text("near_duplicates")
        expect(page.locator("#latency-figures")).to_contain_text("ms")
        expect(page.locator("#models")).to_contain_text("breast-cancer")
        expect(page.locator("#drift")).not_to_be_empty()
        page.wait_for_timeout(3500)  # a second poll: the rates
        page.screenshot(path=str(out / "02-incident-and-quarantine.png"), full_page=True)

        # 5. CSRF, from the attacker's side. The page's own origin without the token:
        refused = page.evaluate(
            """async (path) => (await fetch(path, {method: "POST", credentials: "same-origin",
                   headers: {"Content-Type": "application/json"}, body: "{}"})).status""",
            f"/v2/admin/keys/{thief_id}/release",
        )
        assert refused == 401
        # A form on another site posting to the release route (the browser keeps the cookie back).
        context.route(
            "http://attacker.test/**",
            lambda route: route.fulfill(
                content_type="text/html",
                body=f'<form id="f" method="POST" enctype="text/plain" '
                f'action="{server.base_url}/v2/admin/keys/{thief_id}/release">'
                '<input name="{}" value=""></form><script>document.getElementById("f").submit()</script>',
            ),
        )
        attacker = context.new_page()
        with attacker.expect_navigation():
            attacker.goto("http://attacker.test/")
        assert '"code":"unauthenticated"' in attacker.content()
        attacker.close()
        with server.client(keys["operator"]) as operator:
            listed = operator.get("/v2/admin/summary").json()["quarantined_keys"]
        assert [k["key_id"] for k in listed] == [thief_id]  # still quarantined

        # 6. Acknowledge the incident, then release the key, from the page.
        incident_row.get_by_role("button", name="Acknowledge").click()
        expect(page.locator("#message")).to_contain_text(f"Acknowledge incident {incident['id']}: done")
        expect(incident_row).to_contain_text("investigating")
        page.locator("#quarantined tbody tr", has_text=thief_id).get_by_role("button", name="Release").click()
        expect(page.locator("#message")).to_contain_text(f"Release key {thief_id}: done")
        expect(page.locator("#quarantined")).to_contain_text("No key is quarantined.")
        page.screenshot(path=str(out / "03-acknowledged-and-released.png"), full_page=True)
        with server.client(keys["thief"]) as thief:
            assert thief.get("/v2/models/breast-cancer").status_code == 200  # the key is back

        # 7. Sign out: the same cookie, replayed, is refused.
        session_cookie = {"bastion_session": cookie["value"]}
        page.click("#logout")
        page.wait_for_url(f"{server.base_url}/dashboard/login")
        assert context.cookies() == []
        with httpx.Client(base_url=server.base_url, cookies=session_cookie) as replay:
            assert replay.get("/v2/admin/summary").status_code == 401
        page.screenshot(path=str(out / "04-signed-out.png"))
        assert not [p for p in problems if "Content Security Policy" in p or "Refused" in p], problems
        browser.close()

    # 8. The audit log holds each step, by whom and how.
    server.stop()
    operator_id = keys["operator"].split("_")[1]
    records = _audit(site["root"])
    by_operator = [r for r in records if r.get("principal") == f"key:{operator_id}"]
    opened = [r for r in by_operator if r["route"] == "session" and r["decision"] == "allow"]
    assert [r.get("change") for r in opened] == ["session_opened"]
    (ack,) = [r for r in by_operator if r["route"] == "incident_transition"]
    assert (ack["via"], ack["target"], ack["change"]) == (
        "session",
        f"incident:{incident['id']}",
        "state=investigating",
    )
    (release,) = [r for r in by_operator if r["route"] == "key_release" and r["decision"] == "allow"]
    assert (release["via"], release["target"], release["change"]) == (
        "session",
        f"key:{thief_id}",
        "released",
    )
    assert [r["change"] for r in by_operator if r["route"] == "session_logout"] == ["session_closed"]
    refusals = [r["reason"] for r in records if r["route"] == "key_release" and r["decision"] == "deny"]
    assert "session_csrf_missing" in refusals  # the page's fetch without the token
    assert "missing_credentials" in refusals  # the cross-site form: no cookie came with it
    analyst_id = keys["analyst"].split("_")[1]
    denied = {r["route"] for r in records if r.get("principal") == f"key:{analyst_id}" and r["status"] == 403}
    assert {"session", "dashboard", "summary", "incidents", "incident_transition", "key_release"} <= denied


def test_a_session_cookie_belongs_to_its_deployment(site: dict[str, Any], tmp_path: Path) -> None:
    """Kept in the deployment's store (its state directory here): the next process on it (a restart,
    another worker) accepts the cookie; another deployment, even one that knows the same admin key,
    refuses it; after logout nobody accepts it."""
    server: RunningServer = site["server"]
    if server.process.poll() is not None:  # the first test stopped it to read the audit log
        server = site["server"] = start_server(site["config"], site["root"] / "server2.log")
    with server.client(site["keys"]["operator"]) as operator:
        opened = operator.post("/v2/admin/session", json={})
    assert opened.status_code == 200
    set_cookie = opened.headers["set-cookie"]
    assert "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie and "Max-Age=1800" in set_cookie
    value = opened.cookies["bastion_session"]
    csrf = opened.json()["csrf_token"]
    assert value not in opened.text and csrf not in set_cookie
    with httpx.Client(base_url=server.base_url, cookies={"bastion_session": value}) as browser:
        assert browser.get("/v2/admin/summary").status_code == 200
        page = browser.get("/dashboard")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert page.headers["x-frame-options"] == "DENY"
        assert csrf in page.text  # the page holds the token, in a <meta>
        # The cookie is read on /dashboard and /v2/admin/* only.
        assert browser.get("/metrics").status_code == 401
        assert browser.get("/v2/models/breast-cancer").status_code == 401
    # The state directory holds hashes, never the cookie's secret nor the CSRF token.
    stored = (site["root"] / "state" / "records.db").read_bytes()
    assert value.split(".")[1].encode() not in stored and csrf.encode() not in stored

    # Another deployment that knows the same admin key (its key file copied): the key works there,
    # the cookie does not.
    other_config, _ = write_test_deployment(tmp_path)
    (tmp_path / "state").mkdir(exist_ok=True)
    with (
        sqlite3.connect(site["root"] / "state" / "keys.db") as source,
        sqlite3.connect(tmp_path / "state" / "keys.db") as copy,
    ):
        source.backup(copy)  # with what the running server's WAL holds
    other = start_server(other_config, tmp_path / "other.log")
    try:
        with other.client(site["keys"]["operator"]) as operator:
            assert operator.get("/v2/admin/summary").status_code == 200
        with httpx.Client(base_url=other.base_url, cookies={"bastion_session": value}) as replay:
            refused = replay.get("/v2/admin/summary")
        assert refused.status_code == 401
        assert "Max-Age=0" in refused.headers["set-cookie"]  # the browser is told to drop it
    finally:
        other.stop()

    # A restart of this deployment: the session goes on, with the same CSRF token; logout ends it.
    server.stop()
    restarted = site["server"] = start_server(site["config"], site["root"] / "server3.log")
    with httpx.Client(base_url=restarted.base_url, cookies={"bastion_session": value}) as browser:
        assert browser.get("/v2/admin/summary").status_code == 200
        assert csrf in browser.get("/dashboard").text
        assert browser.post("/v2/admin/session/logout", json={}).status_code == 401  # no CSRF token
        ended = browser.post("/v2/admin/session/logout", json={}, headers={"X-CSRF-Token": csrf})
        assert ended.status_code == 200
    with httpx.Client(base_url=restarted.base_url, cookies={"bastion_session": value}) as replay:
        refused = replay.get("/v2/admin/summary")
    assert refused.status_code == 401
    assert "Max-Age=0" in refused.headers["set-cookie"]
