"""A token revoked through one worker (admin endpoint) must be refused by every worker within 1 s.
Each probe opens a new connection (SO_REUSEPORT spreads them over both workers)."""

from __future__ import annotations

import collections
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import *

ROOTDIR = Path("/tmp/rt2_tokrev")
import shutil

shutil.rmtree(ROOTDIR, ignore_errors=True)
config, build = deploy(ROOTDIR)
admin = create_key(config, "admin")
analyst = create_key(config, "analyst")
srv = start_server(config, ROOTDIR / "server.log", "--workers", "2")
try:
    time.sleep(3)
    tok = httpx.post(srv.base_url + "/v2/auth/token", headers={"Authorization": f"Bearer {analyst}"}).json()
    jwt, jti = tok["access_token"], tok.get("jti")
    if not jti:
        import base64
        import json

        jti = json.loads(base64.urlsafe_b64decode(jwt.split(".")[1] + "==="))["jti"]

    def probe():
        with httpx.Client(timeout=5) as c:
            return c.get(
                srv.base_url + "/v2/models/breast-cancer", headers={"Authorization": f"Bearer {jwt}"}
            ).status_code

    print("before", collections.Counter(probe() for _ in range(10)))
    r = httpx.post(
        srv.base_url + f"/v2/admin/tokens/{jti}/revoke", headers={"Authorization": f"Bearer {admin}"}
    )
    print("revoke", r.status_code, r.text[:100])
    t0 = time.monotonic()
    seen = collections.Counter()
    while time.monotonic() - t0 < 3:
        s = probe()
        seen[(round(time.monotonic() - t0, 0), s)] += 1
    print("after revoke (second, status):", dict(seen))
    # non-admin: can an analyst (or a token) grow the deny list?
    r = httpx.post(
        srv.base_url + "/v2/admin/tokens/xyz/revoke", headers={"Authorization": f"Bearer {analyst}"}
    )
    print("analyst revoke", r.status_code)
finally:
    srv.stop()
