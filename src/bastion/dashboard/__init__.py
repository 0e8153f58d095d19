"""The operators' dashboard: its page, script and style sheet ship in the package (no CDN).

`page(csrf_token)` is the dashboard's HTML with the session's CSRF token in a `<meta>` element (the
only value the server writes into a page, escaped); `asset(path)` the fixed files anyone may fetch
(the login page, the script, the style sheet), which hold no data. The script builds every element
with `textContent`, never `innerHTML`, so no value from the summary is read as markup.
"""

from __future__ import annotations

import html
from functools import cache
from importlib.resources import files

# Path -> (file in static/, content type). Nothing else under /dashboard/ is served.
ASSETS: dict[str, tuple[str, str]] = {
    "/dashboard/login": ("login.html", "text/html; charset=utf-8"),
    "/dashboard/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/dashboard/app.css": ("app.css", "text/css; charset=utf-8"),
}
PAGE_TYPE = "text/html; charset=utf-8"
_CSRF_SLOT = "{{csrf_token}}"


@cache
def _read(name: str) -> bytes:
    return files("bastion.dashboard").joinpath("static", name).read_bytes()


def asset(path: str) -> tuple[bytes, str] | None:
    """(body, content type) of a public dashboard file, or None for any other path."""
    entry = ASSETS.get(path)
    if entry is None:
        return None
    name, content_type = entry
    return _read(name), content_type


def page(csrf_token: str) -> bytes:
    """The dashboard page for a session whose CSRF token is `csrf_token` ('' for a caller with a key:
    the page then shows but its actions are refused)."""
    template = _read("dashboard.html").decode("utf-8")
    return template.replace(_CSRF_SLOT, html.escape(csrf_token, quote=True)).encode("utf-8")
