"""Connections to the gRPC port that never speak (no HTTP/2 preface), or speak HTTP/2 and then hold
the connection idle: how many does the server keep, for how long, and does REST (same process, same
file-descriptor limit) keep answering?

    .venv/bin/python bench/redteam_issue10/grpc_connections.py [connections] [seconds]

The HTTP front end bounds its connections (`[server] max_connections`, head timeout); the gRPC port
has `idle_timeout_seconds` (60) and, over TLS, the handshake timeout.
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import sys
import time

import httpx
from common import demo

N = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
HOLD = float(sys.argv[2]) if len(sys.argv) > 2 else 20.0
d = demo()
host, port = d.grpc.rsplit(":", 1)
resource.setrlimit(resource.RLIMIT_NOFILE, (N + 512, N + 512))


def server_fds() -> int:
    pid = None
    for line in os.popen(f"ss -ltnpH 'sport = :{port}'"):  # noqa: S605
        if "pid=" in line:
            pid = line.split("pid=")[1].split(",")[0]
    return len(os.listdir(f"/proc/{pid}/fd")) if pid else -1


print("server fds before:", server_fds())
socks = []
for i in range(N):
    s = socket.create_connection((host, int(port)))
    if i % 2:
        s.sendall(
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")
        )  # preface + SETTINGS
    socks.append(s)
print(f"{N} connections open (half silent, half after the HTTP/2 preface); server fds:", server_fds())
t0 = time.time()
while time.time() - t0 < HOLD:
    closed = 0
    for s in socks:
        s.setblocking(False)
        try:
            if s.recv(65536) == b"":
                closed += 1
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
    try:
        code = httpx.get(d.url("/v2/health/live"), timeout=3).status_code
    except httpx.HTTPError as e:
        code = type(e).__name__
    print(
        f"t={time.time() - t0:5.1f}s closed by the server: {closed}/{N}; REST live: {code}; server fds: {server_fds()}"
    )
    time.sleep(5)
for s in socks:
    with contextlib.suppress(OSError):
        s.close()
