"""Random byte mutations of valid requests over raw sockets: every answer is an HTTP status line
with a JSON body (or a close), never a 500, never a hang past the head deadline; health is served
after each batch.  Usage: raw_mutations.py HOST PORT KEY [N=2000] [seed=1]"""

import json
import random
import socket
import sys
import time

HOST, PORT, KEY = sys.argv[1], int(sys.argv[2]), sys.argv[3]
N = int(sys.argv[4]) if len(sys.argv) > 4 else 2000
rng = random.Random(int(sys.argv[5]) if len(sys.argv) > 5 else 1)
body = json.dumps(
    {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 30], "data": [10.0] * 30}]}
)
seeds = [
    f"POST /v2/models/breast-cancer/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
    f"Content-Length: {len(body)}\r\n\r\n{body}".encode(),
    f"POST /v2/models/breast-cancer/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
    f"Transfer-Encoding: chunked\r\n\r\n{len(body):x}\r\n{body}\r\n0\r\n\r\n".encode(),
    b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n",
    f"POST /v2/auth/token HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Length: 2\r\n\r\n{{}}".encode(),
]
TOKENS = [
    b"\r\n",
    b"\n",
    b"\r",
    b"\x00",
    b" ",
    b"\t",
    b":",
    b";",
    b",",
    b"0",
    b"-1",
    b"ffffffff",
    b"chunked",
    b"Transfer-Encoding: chunked\r\n",
    b"Content-Length: 5\r\n",
    b"Expect: 100-continue\r\n",
    b"\xff",
    b"%00",
]


def mutate(data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        i = rng.randrange(len(b) + 1)
        if op < 0.3 and b:
            del b[i : i + rng.randint(1, 8)]
        elif op < 0.6:
            b[i:i] = rng.choice(TOKENS)
        elif op < 0.8 and b:
            b[min(i, len(b) - 1)] = rng.randrange(256)
        else:
            b[i:i] = data[rng.randrange(len(data)) :][: rng.randint(1, 40)]
    return bytes(b)


bad = []
statuses: dict[bytes, int] = {}
t0 = time.monotonic()
for n in range(N):
    payload = mutate(rng.choice(seeds))
    s = socket.create_connection((HOST, PORT), timeout=12)
    try:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    except (TimeoutError, OSError) as e:
        out = f"<{type(e).__name__}>".encode()
    finally:
        s.close()
    status = out[9:12]
    statuses[status] = statuses.get(status, 0) + 1
    if (
        b" 500 " in out[:16]
        or out.startswith(b"<Timeout")
        or (out and not out.startswith(b"HTTP/1.1 ") and not out.startswith(b"<ConnectionReset"))
    ):
        bad.append((payload, out[:200]))
    if n % 500 == 499:
        h = socket.create_connection((HOST, PORT), timeout=3)
        h.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert h.recv(100).startswith(b"HTTP/1.1 200"), "health not served"
        h.close()
print(f"{N} mutated requests in {time.monotonic() - t0:.0f} s; statuses {statuses}; suspicious: {len(bad)}")
for p, o in bad[:10]:
    print(repr(p[:300]), "->", repr(o))
