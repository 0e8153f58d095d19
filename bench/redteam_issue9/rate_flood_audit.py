"""A valid weak key flooding past its rate limit: is each 429 a durable audit record (and fsync)?
Usage: rate_flood_audit.py URL STATE_DIR KEY N"""

import collections
import os
import sys
import time

import httpx

URL, STATE, KEY, N = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])


def size() -> int:
    return sum(os.path.getsize(os.path.join(STATE, f)) for f in os.listdir(STATE) if f.startswith("audit"))


before = size()
codes = collections.Counter()
t0 = time.monotonic()
with httpx.Client(base_url=URL, headers={"Authorization": f"Bearer {KEY}"}) as c:
    for _ in range(N):
        codes[c.get("/v2/models/breast-cancer").status_code] += 1
dt = time.monotonic() - t0
time.sleep(1)
print(f"{N} requests in {dt:.1f} s ({N / dt:.0f}/s): {dict(codes)}; audit files grew {size() - before} bytes")
