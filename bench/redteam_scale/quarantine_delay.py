"""Quarantine and release delay across two replicas on Redis (db 14): the quarantine is written into the
shared key record as a replica's query auditing writes it (field + counter in one step), the release
goes through `bastion keys release`; both servers are polled until they change their answer."""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import redis

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tests.helpers import BASTION, start_server, write_test_deployment

from bastion.demo import infer_request

URL = "redis://127.0.0.1:6379/14"


def main() -> None:
    prefix = f"rtscale-q-{secrets.token_hex(4)}:"
    base = Path(tempfile.mkdtemp(prefix="rt-quar-"))
    cfg_a, build = write_test_deployment(base / "a")
    text = cfg_a.read_text().replace(
        '[state]\nbackend = "sqlite"\n',
        f'[state]\nbackend = "redis"\nredis_url = "{URL}"\nredis_prefix = "{prefix}"\n',
    )
    cfg_a.write_text(text)
    shutil.copytree(base / "a", base / "b", ignore=shutil.ignore_patterns("server.lock"))
    cfg_b = base / "b" / cfg_a.name
    servers = [start_server(cfg_a, base / "a.log"), start_server(cfg_b, base / "b.log")]
    r = redis.Redis.from_url(URL)
    body = infer_request(build.features[:2])
    try:

        def ask(s, key):
            resp = httpx.post(
                f"{s.base_url}/v2/models/breast-cancer/infer",
                json=body,
                timeout=10,
                headers={"Authorization": f"Bearer {key}"},
            )
            return resp.status_code, resp.json().get("code", "")

        for trial in range(4):
            key = subprocess.run(
                [*BASTION, "keys", "create", "--config", str(cfg_a), "--name", "q", "--role", "analyst"],
                capture_output=True,
                text=True,
            ).stdout.strip()
            kid = key.split("_")[1]
            first = [ask(s, key) for s in servers]
            rec = json.loads(r.hget(f"{prefix}records:api_keys", kid))
            rec["quarantined_at"] = time.time()
            with r.pipeline(transaction=True) as p:
                p.hset(f"{prefix}records:api_keys", kid, json.dumps(rec, sort_keys=True))
                p.incr(f"{prefix}records-version:api_keys")
                p.execute()
            t0 = time.monotonic()
            out = {}

            def poll(i, s, want_ok: bool):
                while time.monotonic() - t0 < 5:
                    st = ask(s, key)
                    if (st[0] == 200) == want_ok:
                        out[i] = (round(time.monotonic() - t0, 3), st)
                        return
                    time.sleep(0.005)
                out[i] = ("never", st)

            ts = [threading.Thread(target=poll, args=(i, s, False)) for i, s in enumerate(servers)]
            [t.start() for t in ts]
            [t.join() for t in ts]
            q = dict(out)
            out.clear()
            subprocess.run([*BASTION, "keys", "release", "--config", str(cfg_a), kid], capture_output=True)
            t0 = time.monotonic()
            ts = [threading.Thread(target=poll, args=(i, s, True)) for i, s in enumerate(servers)]
            [t.start() for t in ts]
            [t.join() for t in ts]
            print(f"trial {trial}: before {first}; quarantine seen after {q}; release seen after {dict(out)}")
    finally:
        for s in servers:
            s.stop()
        ks = list(r.scan_iter(match=f"{prefix}*"))
        if ks:
            r.delete(*ks)
        print("cleaned", len(ks), "redis keys")


if __name__ == "__main__":
    main()
