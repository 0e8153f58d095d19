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

from tests.helpers import RunningServer, create_key, free_port, start_server, write_test_deployment

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("ops-redteam")
    config, build = write_test_deployment(root)
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
