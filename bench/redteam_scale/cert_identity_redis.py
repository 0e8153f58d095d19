"""mTLS identities on the Redis backend (a private redis-server this script starts and stops): Redis
commands per request for a certificate principal vs an API key, and what a certificate client sees
while Redis is down."""

from __future__ import annotations

import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import deploy, free_port

from bastion.demo import infer_request


def hgets(r: redis.Redis) -> dict[str, int]:
    stats = r.info("commandstats")
    return {
        k: v["calls"] for k, v in stats.items() if k in ("cmdstat_hget", "cmdstat_get", "cmdstat_evalsha")
    }


def main() -> None:
    port = free_port()
    rdir = tempfile.mkdtemp(prefix="rt-redis-")
    rs = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            rdir,
        ],
        stdout=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    r = redis.Redis(port=port)
    try:
        root = Path(tempfile.mkdtemp(prefix="rt-certredis-"))
        d = deploy(root, grpc=False, state=f'backend = "redis"\nredis_url = "redis://127.0.0.1:{port}/0"\n')
        body = infer_request(d.rows)
        ctx = ssl.create_default_context(cafile=d.ca.pem)
        ctx.load_cert_chain(d.certs["ingest"].cert, d.certs["ingest"].key)
        with (
            httpx.Client(verify=ctx, timeout=10) as cert_client,
            httpx.Client(
                verify=ssl.create_default_context(cafile=d.ca.pem),
                timeout=10,
                headers={"Authorization": f"Bearer {d.keys['analyst']}"},
            ) as key_client,
        ):
            for name, c in (("certificate", cert_client), ("api key", key_client)):
                c.post(f"{d.url}/v2/models/breast-cancer/infer", json=body)
                before = hgets(r)
                t = time.monotonic()
                codes = Counter(
                    c.post(f"{d.url}/v2/models/breast-cancer/infer", json=body).status_code
                    for _ in range(100)
                )
                after = hgets(r)
                print(
                    f"{name:12s} 100 requests in {time.monotonic() - t:.2f}s {dict(codes)}; redis calls:",
                    {k: after.get(k, 0) - before.get(k, 0) for k in after},
                )
            rs.send_signal(signal.SIGSTOP)
            t = time.monotonic()
            got = Counter()
            while time.monotonic() - t < 3:
                try:
                    resp = cert_client.post(f"{d.url}/v2/models/breast-cancer/infer", json=body)
                    got[(resp.status_code, resp.json().get("code", ""))] += 1
                except httpx.TransportError as e:
                    got[type(e).__name__] += 1
            print("certificate client while Redis is hung:", dict(got))
            rs.send_signal(signal.SIGCONT)
        d.server.stop()
    finally:
        rs.send_signal(signal.SIGCONT)
        rs.terminate()
        rs.wait()


if __name__ == "__main__":
    main()
