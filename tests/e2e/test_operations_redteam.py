"""Operations from the attacker's side, second red team of issue 12 (bench/redteam_issue12/FINDINGS.md):
a session cookie tossed by a page on another port of the host must not log the operator out (F5), and
a release must be part of the incident it ends (F4), from the API, the dashboard and the CLI."""

from __future__ import annotations

import http.server
import json
import shutil
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.test_extraction import _probe_until_quarantined
from tests.helpers import RunningServer, create_key, free_port, run_cli, start_server, write_test_deployment

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("ops-redteam")
    config, build = write_test_deployment(root)
    text = config.read_text()  # diabetes may be isolated (its ladder is one step, isolate)
    at = text.index("\n", text.index("trusted_keys", text.index('"bundles/diabetes-1"'))) + 1
    config.write_text(text[:at] + 'containment = ["isolate"]\n' + text[at:])
    server = start_server(config, root / "server.log")
    yield {
        "root": root,
        "config": config,
        "build": build,
        "server": server,
        "admin": create_key(config, "admin"),
    }
    server.stop()


def _login(server: RunningServer, admin: str) -> tuple[str, str]:
    """A session: (the cookie's value, the CSRF token)."""
    with server.client(admin) as client:
        opened = client.post("/v2/admin/session", json={})
    assert opened.status_code == 200, opened.text
    cookie = opened.headers["set-cookie"].split(";")[0].split("=", 1)[1]
    return cookie, opened.json()["csrf_token"]


def _audit(root: Path) -> list[dict[str, Any]]:
    with sqlite3.connect(root / "state" / "audit.db") as db:
        return [json.loads(b) for (b,) in db.execute("SELECT body FROM records ORDER BY seq")]


def test_a_tossed_session_cookie_neither_hides_nor_clears_the_real_one(site: dict[str, Any]) -> None:
    """F5: the browser sends the cookie with the longest Path first; a junk one set for /v2/admin by
    a page on another port of the host came first and the server refused the session and cleared it."""
    server: RunningServer = site["server"]
    cookie, csrf = _login(server, site["admin"])
    tossed = {
        "Cookie": f"bastion_session=junk; bastion_session={'A' * 22}.{'B' * 43}; bastion_session={cookie}"
    }
    with httpx.Client(base_url=server.base_url, timeout=30) as browser:
        summary = browser.get("/v2/admin/summary", headers=tossed)
        assert summary.status_code == 200, summary.text
        assert "set-cookie" not in summary.headers  # the real cookie is not cleared
        page = browser.get("/dashboard", headers={**tossed, "Accept": "text/html"})
        assert page.status_code == 200 and csrf in page.text
        # A state change with the real session's CSRF token goes through too.
        logout_probe = browser.post(
            "/v2/admin/incidents/999999/notes", json={"note": "x"}, headers={**tossed, "X-CSRF-Token": csrf}
        )
        assert logout_probe.status_code == 404, logout_probe.text
        # Junk alone is still refused (and cleared); a CSRF token of another session still fails.
        alone = browser.get("/v2/admin/summary", headers={"Cookie": "bastion_session=junk"})
        assert alone.status_code == 401 and "Max-Age=0" in alone.headers["set-cookie"]
        forged = browser.post(
            "/v2/admin/incidents/999999/notes",
            json={"note": "x"},
            headers={**tossed, "X-CSRF-Token": "x" * 43},
        )
        assert forged.status_code == 401


def test_cookie_tossing_from_another_port_in_chromium(site: dict[str, Any]) -> None:
    """F5 as a browser meets it: a page served from another port of the same host sets
    `bastion_session` for /dashboard and /v2/admin; the operator's dashboard keeps working."""
    if shutil.which(CHROMIUM) is None:
        raise AssertionError(f"{CHROMIUM} is missing: run scripts/ensure-chromium")
    from playwright.sync_api import sync_playwright

    server: RunningServer = site["server"]
    evil_page = (
        b"<!doctype html><script>document.cookie='bastion_session=junk; path=/dashboard';"
        b"document.cookie='bastion_session=junk; path=/v2/admin';document.title='tossed'</script>"
    )

    class Evil(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(evil_page)

        def log_message(self, *args: object) -> None:
            pass

    evil = http.server.HTTPServer(("127.0.0.1", free_port()), Evil)
    threading.Thread(target=evil.serve_forever, daemon=True).start()
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            context = browser.new_context()
            page = context.new_page()
            page.goto(f"{server.base_url}/dashboard/login")
            page.fill("#api-key", site["admin"])
            page.click("#login-button")
            page.wait_for_url(f"{server.base_url}/dashboard")
            other = context.new_page()
            other.goto(f"http://127.0.0.1:{evil.server_address[1]}/")
            other.wait_for_function("document.title === 'tossed'")
            assert len([c for c in context.cookies() if c["name"] == "bastion_session"]) == 3
            page.reload()
            page.wait_for_timeout(500)
            assert page.url == f"{server.base_url}/dashboard"  # not sent to the login page
            status = page.evaluate("fetch('/v2/admin/summary').then(r => r.status)")
            assert status == 200
            real = [c for c in context.cookies() if c["name"] == "bastion_session" and c["path"] == "/"]
            assert real and real[0]["value"] != "junk"  # the real cookie was not cleared
            browser.close()
    finally:
        evil.shutdown()


def _incident_of(server: RunningServer, admin: str, principal: str) -> dict[str, Any]:
    with server.client(admin) as client:
        listed = client.get("/v2/admin/incidents").json()["incidents"]
        (newest,) = [i for i in listed if i["principal"] == principal][:1]
        return dict(client.get(f"/v2/admin/incidents/{newest['id']}").json())


def test_a_release_is_in_the_incident_it_ends_and_in_the_audit_log(site: dict[str, Any]) -> None:
    """F4: a key released over the admin API (the dashboard's Release) or with `bastion keys release`
    left its incident with no event: the review could not see who lifted containment, or when; and
    the CLI's release was in no audit record at all."""
    server: RunningServer = site["server"]
    admin, config, x = site["admin"], site["config"], site["build"].features
    admin_id = admin.split("_")[1]
    for n, how in enumerate(("api", "cli")):
        thief = create_key(config, "admin")
        thief_id = thief.split("_")[1]
        _probe_until_quarantined(server, thief, x, seed=n)
        if how == "api":
            with server.client(admin) as client:
                answer = client.post(f"/v2/admin/keys/{thief_id}/release")
            assert answer.status_code == 200, answer.text
            request_id, actor = answer.headers["x-request-id"], f"key:{admin_id}"
        else:
            out = run_cli("keys", "release", thief_id, "--config", config).stdout
            assert f"released {thief_id}" in out
            actor = None
        incident = _incident_of(server, admin, f"key:{thief_id}")
        released = [e for e in incident["events"] if e["action"] == "released"]
        assert len(released) == 1, incident["events"]
        event = released[0]
        assert event["note"].startswith("key released: quarantine lifted (request ")
        if actor is not None:
            assert event["actor"] == actor and request_id in event["note"]
        else:
            assert event["actor"].startswith("cli:")
            request_id = event["note"].rsplit(" ", 1)[1].rstrip(")")
        # The audit record the note cites: the release, by whom, on what.
        (record,) = [r for r in _audit(site["root"]) if r.get("request_id") == request_id]
        assert (record["route"], record["target"], record["change"]) == (
            "key_release",
            f"key:{thief_id}",
            "released",
        )
        assert record["via"] == ("cli" if how == "cli" else "key")
        exported = run_cli("incidents", "export", str(incident["id"]), "--config", config).stdout
        assert "| released | key released: quarantine lifted" in exported
        # F12: the export carries the audit records of the changes (their seq), not only the tipping one's.
        assert f"| {record['seq']} | " in exported.split("## Audit records of the changes")[1]
        doc = json.loads(
            run_cli("incidents", "export", str(incident["id"]), "--config", config, "--format", "json").stdout
        )
        assert [(c["seq"], c["route"]) for c in doc["audit_changes"]] == [(record["seq"], "key_release")]
    assert "OK:" in run_cli("audit", "verify", "--config", config).stdout


def test_an_isolated_model_is_released_from_the_dashboard(site: dict[str, Any]) -> None:
    """F7: the dashboard showed an isolated model with no action; the operator had to use the CLI."""
    if shutil.which(CHROMIUM) is None:
        raise AssertionError(f"{CHROMIUM} is missing: run scripts/ensure-chromium")
    import time

    import numpy as np
    from playwright.sync_api import expect, sync_playwright

    from bastion.demo import infer_request, train_regressor
    from bastion.isolation import IsolationStore

    server: RunningServer = site["server"]
    _, features = train_regressor()
    row = infer_request(features[:1].astype(np.float32))
    store = IsolationStore(site["root"] / "state" / "isolation.db")
    assert store.isolate("diabetes", now=time.time(), reason="test: isolated by hand")
    store.close()
    with server.client(site["admin"]) as client:
        refused = client.post("/v2/models/diabetes/infer", json=row)
    assert (refused.status_code, refused.json()["code"]) == (503, "model_isolated")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1600})
        page.goto(f"{server.base_url}/dashboard/login")
        page.fill("#api-key", site["admin"])
        page.click("#login-button")
        page.wait_for_url(f"{server.base_url}/dashboard")
        row_on_page = page.locator("#models tbody tr", has_text="diabetes")
        expect(row_on_page).to_contain_text("isolated")
        row_on_page.get_by_role("button", name="Release").click()
        expect(page.locator("#message")).to_contain_text("Release model diabetes: done")
        expect(row_on_page).to_contain_text("serving")
        browser.close()
    with server.client(site["admin"]) as client:
        assert client.post("/v2/models/diabetes/infer", json=row).status_code == 200
    released = [
        r for r in _audit(site["root"]) if r.get("route") == "model_release" and r.get("status") == 200
    ]
    assert [(r["target"], r["change"], r["via"]) for r in released] == [
        ("model:diabetes", "released", "session")
    ]


def test_a_service_identity_is_released_over_the_admin_api(site: dict[str, Any]) -> None:
    """F9: a service identity (mTLS, `cert:<name>`) quarantined or throttled by query auditing could be
    released only with the CLI: the admin API's path took 16 hex digits, and the dashboard showed no
    Release for it."""
    import time

    from bastion.containment import MeasureStore
    from bastion.keys import KeyStore

    server: RunningServer = site["server"]
    state = site["root"] / "state"
    keys, measures = KeyStore(state / "keys.db"), MeasureStore(state / "containment.db")
    try:
        assert keys.quarantine("cert:scorer", now=time.time())
        measures.apply(
            "cert:scorer", "breast-cancer", "throttle", value="1.0", now=time.time(), until=time.time() + 600
        )
    finally:
        keys.close()
        measures.close()
    with server.client(site["admin"]) as client:
        summary = client.get("/v2/admin/summary").json()
        assert "cert:scorer" in [k["key_id"] for k in summary["quarantined_keys"]]
        assert "cert:scorer" in [c["principal"] for c in summary["contained"]]
        released = client.post("/v2/admin/keys/cert%3Ascorer/release")
        assert released.status_code == 200, released.text
        summary = client.get("/v2/admin/summary").json()
        assert "cert:scorer" not in [k["key_id"] for k in summary["quarantined_keys"]]
        assert "cert:scorer" not in [c["principal"] for c in summary["contained"]]
        # Anything else is still refused by the path's pattern.
        assert client.post("/v2/admin/keys/cert:../release").status_code == 404
        assert client.post("/v2/admin/keys/key:0123456789abcdef/release").status_code == 404
    (record,) = [
        r
        for r in _audit(site["root"])
        if r.get("route") == "key_release" and r.get("target") == "cert:scorer"
    ]
    assert record["status"] == 200 and record["change"] == "released"
    with server.client(site["admin"]) as client:
        refused = client.post("/v2/admin/keys/cert:scorer/revoke-tokens", json={})
    assert (refused.status_code, refused.json()["code"]) == (404, "not_found")
