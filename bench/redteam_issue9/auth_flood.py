"""Anonymous / bad-credential flood: how many get through to identity, and how much the audit grows.
Usage: auth_flood.py URL STATE_DIR N [header:value ...] (e.g. X-Forwarded-For:1.2.3.4 to try spoofing)"""

import collections
import os
import sys
import time

import httpx

URL, STATE, N = sys.argv[1], sys.argv[2], int(sys.argv[3])
extra = dict(h.split(":", 1) for h in sys.argv[4:])


def size():
    return sum(os.path.getsize(os.path.join(STATE, f)) for f in os.listdir(STATE) if f.startswith("audit"))


before = size()
codes = collections.Counter()
shapes = [
    ("GET", "/v2/models/breast-cancer", {}),
    ("GET", "/v2/models/breast-cancer", {"Authorization": "Bearer bst_0123456789abcdef_" + "A" * 43}),
    ("GET", "/v2/models/breast-cancer", {"Authorization": "Basic Zm9vOmJhcg=="}),
    ("POST", "/v2/auth/token", {"Authorization": "Bearer nonsense"}),
    ("GET", "/nope", {}),
    ("GET", "/v2/models/breast-cancer", {"Authorization": "Bearer eyJhbGciOiJub25lIn0.e30."}),
]
t0 = time.monotonic()
with httpx.Client(base_url=URL, timeout=10) as c:
    for i in range(N):
        m, p, h = shapes[i % len(shapes)]
        h = {**h, **{k: v.replace("{i}", str(i)) for k, v in extra.items()}}
        r = c.request(m, p, headers=h)
        codes[r.status_code] += 1
dt = time.monotonic() - t0
time.sleep(1.5)
print(f"{N} requests in {dt:.1f} s: {dict(codes)}; audit files grew {size() - before} bytes")
