"""A steady load from a second process: `python -m tests.e2e.loadgen URL KEY BODIES SECONDS OUT [THREADS]`.

Each thread sends the request bodies in BODIES (a JSON list) round-robin for SECONDS and
writes one JSON line per request to OUT: send time, status, answering version, error code.
A transport failure (refused, reset, timeout) is recorded as status 0.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import httpx


def run(url: str, key: str, bodies: list[bytes], seconds: float, out: list[dict[str, object]]) -> None:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    deadline = time.time() + seconds
    i = 0
    with httpx.Client(headers=headers, timeout=10) as client:
        while time.time() < deadline:
            sent = time.time()
            try:
                r = client.post(url, content=bodies[i % len(bodies)])
                code = r.json().get("code") if r.status_code != 200 else None
                out.append(
                    {
                        "sent": sent,
                        "status": r.status_code,
                        "version": r.headers.get("x-model-version"),
                        "code": code,
                    }
                )
            except httpx.HTTPError as e:
                out.append({"sent": sent, "status": 0, "version": None, "code": type(e).__name__})
            i += 1


def main() -> None:
    url, key, bodies_path, seconds, out_path = sys.argv[1:6]
    threads = int(sys.argv[6]) if len(sys.argv) > 6 else 2
    bodies = [json.dumps(b).encode() for b in json.loads(Path(bodies_path).read_text())]
    results: list[list[dict[str, object]]] = [[] for _ in range(threads)]
    workers = [
        threading.Thread(target=run, args=(url, key, bodies, float(seconds), results[t]))
        for t in range(threads)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    with open(out_path, "w") as f:
        for rows in results:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
