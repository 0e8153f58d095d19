"""Red team 2: streams with a long prompt, dropped before their first token (during llama.cpp's
prompt processing), one after another; a victim key's short chat is timed meanwhile.

Run: .venv/bin/python bench/redteam_llm/disconnect_prefill2.py ATTACKER_KEY VICTIM_KEY [BASE] [ROUNDS]
Then read the attacker's audit records (token counts) with `bastion audit export`.
"""

from __future__ import annotations

import sys
import threading
import time

import httpx

atk, vic = sys.argv[1], sys.argv[2]
base = sys.argv[3] if len(sys.argv) > 3 else "http://127.0.0.1:8310"
rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 6
filler = " ".join(
    f"Account note {i}: the customer asked about card fees and transfer limits." for i in range(52)
)
body = {
    "model": "assistant",
    "max_tokens": 8,
    "stream": True,
    "messages": [{"role": "user", "content": filler}],
}
results: list[str] = []


def victim() -> None:
    with httpx.Client(base_url=base, timeout=300, headers={"Authorization": f"Bearer {vic}"}) as c:
        for _ in range(3):
            t = time.monotonic()
            r = c.post(
                "/v1/chat/completions",
                json={"model": "assistant", "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]},
            )
            results.append(f"victim {r.status_code} {time.monotonic() - t:.1f}s")
            time.sleep(1)


with httpx.Client(base_url=base, timeout=300, headers={"Authorization": f"Bearer {atk}"}) as c:
    r = c.post("/v1/chat/completions", json={**body, "stream": False})
    print("attacker baseline (not streamed):", r.status_code, r.json().get("usage") or r.json().get("error"))
    th = threading.Thread(target=victim)
    th.start()
    t0 = time.monotonic()
    for i in range(rounds):
        fresh = {**body, "messages": [{"role": "user", "content": f"Ticket {i * 7919}. " + filler}]}
        with c.stream("POST", "/v1/chat/completions", json=fresh) as s:  # a new prompt: no cache
            print(f"attacker round {i} {s.status_code} at {time.monotonic() - t0:.1f}s", flush=True)
            time.sleep(0.4)  # headers and the role chunk only; then gone
    th.join()
print("\n".join(results))
