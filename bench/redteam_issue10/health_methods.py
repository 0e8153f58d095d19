"""The route table says GET for /v2/health/live and /v2/health/ready (so do the OpenAPI document and
the README); the HTTP app answers them for any method.

    .venv/bin/python bench/redteam_issue10/health_methods.py

Expected: as for every other route whose path exists for another method, 401 to an anonymous caller
(405 after authentication). Before the fix: 200 for POST, PUT, DELETE, PATCH.
"""

from __future__ import annotations

import httpx
from common import demo

from bastion.routes import ROUTES, Route

d = demo()
for spec in ROUTES:
    if spec.route in (Route.LIVE, Route.READY):
        for method in ("GET", "POST", "PUT", "DELETE", "PATCH"):
            r = httpx.request(method, d.url(spec.path))
            table = "in the table" if method == spec.method else "not in the table"
            print(f"{method:6} {spec.path:20} {r.status_code} ({table})")
