"""Red team: streams that are abandoned, never read, or held concurrently; health and fairness
while they run.

Run: .venv/bin/python bench/redteam_llm/stream_abuse.py ATTACKER_KEY VICTIM_KEY [--base URL]
- N raw-socket streams that send the request and never read (a slow reader);
- while they run: /v2/health/live latency, and a victim key's small chat request (503 model_busy?);
- then streams cut after the first event: the audit record's tokens charged vs generated.
"""

from __future__ import annotations

import json
import socket
import sys
import time

import httpx

attacker, victim = sys.argv[1], sys.argv[2]
host, port = "127.0.0.1", 8300
base = f"http://{host}:{port}"


def raw_stream(key: str, max_tokens: int = 256) -> socket.socket:
    body = json.dumps({
        "model": "assistant", "max_tokens": max_tokens, "stream": True,
        "messages": [{"role": "user", "content": "Write a long story about a bank."}],
    }).encode()
    s = socket.create_connection((host, port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    s.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key.encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode()
        + b"\r\n\r\n" + body
    )
    return s


socks = [raw_stream(attacker) for _ in range(int(sys.argv[3]) if len(sys.argv) > 3 else 10)]
time.sleep(0.5)
with httpx.Client(base_url=base, timeout=60) as c:
    for i in range(6):
        t0 = time.monotonic()
        h = c.get("/v2/health/live")
        t1 = time.monotonic()
        v = c.post("/v1/chat/completions", headers={"Authorization": f"Bearer {victim}"},
                   json={"model": "assistant", "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]})
        t2 = time.monotonic()
        code = v.json().get("error", {}).get("code") if v.status_code != 200 else "ok"
        print(f"t={i*2}s live {h.status_code} {1000*(t1-t0):.0f} ms; victim chat {v.status_code} {code} {t2-t1:.1f} s")
        time.sleep(2)
for s in socks:
    s.close()
