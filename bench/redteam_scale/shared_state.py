"""Two replicas sharing keys through Redis (db 14) or PostgreSQL, each through its own TCP proxy
(socat) that the script kills (connection refused) or freezes (SIGSTOP: the kernel still accepts
and acknowledges, nothing answers). Usage: shared_state.py redis|postgres
Measures: revocation delay on both replicas; what a client sees while a replica's backend is down or
hung; whether a key revoked during the outage is ever answered; liveness during a hung backend;
(postgres) a table lock held by another session."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tests.helpers import BASTION, free_port, start_server, write_test_deployment

from bastion.demo import infer_request


class Proxy:
    def __init__(self, target_port: int) -> None:
        self.port, self.target = free_port(), target_port
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "socat",
                f"TCP-LISTEN:{self.port},fork,reuseaddr,bind=127.0.0.1",
                f"TCP:127.0.0.1:{self.target}",
            ],
            start_new_session=True,
        )
        time.sleep(0.3)

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def freeze(self, on: bool) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGSTOP if on else signal.SIGCONT)


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BASTION, *args[:2], "--config", str(config), *args[2:]], capture_output=True, text=True, timeout=120
    )


def main() -> None:
    backend = sys.argv[1]
    tag = secrets.token_hex(4)
    base = Path(tempfile.mkdtemp(prefix=f"rt-shared-{backend}-"))
    config_a, build = write_test_deployment(base / "a")
    rows = build.features[:2]
    proxies = {
        "a": Proxy(6379 if backend == "redis" else 5432),
        "b": Proxy(6379 if backend == "redis" else 5432),
    }
    prefix, table = f"rtscale-{tag}:", f"rtscale_{tag}"

    def state(port: int) -> str:
        if backend == "redis":
            return (
                f'backend = "redis"\nredis_url = "redis://127.0.0.1:{port}/14"\nredis_prefix = "{prefix}"\n'
            )
        return f'backend = "postgres"\npostgres_dsn = "postgresql://postgres@127.0.0.1:{port}/postgres"\npostgres_table = "{table}"\n'

    text = config_a.read_text()
    shutil.copytree(base / "a", base / "b", ignore=shutil.ignore_patterns("server.lock"))
    shutil.copytree(base / "a", base / "c", ignore=shutil.ignore_patterns("server.lock"))
    configs = {}
    for name, port in (
        ("a", proxies["a"].port),
        ("b", proxies["b"].port),
        ("c", 6379 if backend == "redis" else 5432),
    ):
        cfg = base / name / config_a.name
        cfg.write_text(text.replace('[state]\nbackend = "sqlite"\n', f"[state]\n{state(port)}"))
        configs[name] = cfg
    servers = {}
    try:
        for n in ("a", "b"):
            servers[n] = start_server(configs[n], base / f"{n}.log")
        body = infer_request(rows)

        def new_key() -> str:
            return cli(configs["c"], "keys", "create", "--name", "rt", "--role", "analyst").stdout.strip()

        def ask(n: str, key: str, timeout: float = 10) -> tuple[int, float, str]:
            t = time.monotonic()
            try:
                r = httpx.post(
                    f"{servers[n].base_url}/v2/models/breast-cancer/infer",
                    json=body,
                    timeout=timeout,
                    headers={"Authorization": f"Bearer {key}"},
                )
                return r.status_code, time.monotonic() - t, r.json().get("code", "")
            except httpx.TransportError as e:
                return -1, time.monotonic() - t, type(e).__name__

        # (a) revocation delay
        delays: dict[str, list[float]] = {"a": [], "b": []}
        for _ in range(5):
            key = new_key()
            assert ask("a", key)[0] == 200 and ask("b", key)[0] == 200
            kid = key.split("_")[1]
            done = {}
            t0 = time.monotonic()
            r = cli(configs["c"], "keys", "revoke", kid)
            t_rev = time.monotonic()  # the CLI returned: committed

            def poll(n: str) -> None:
                while time.monotonic() - t_rev < 5:
                    if ask(n, key)[0] == 401:
                        done[n] = time.monotonic() - t_rev
                        return
                    time.sleep(0.005)
                done[n] = float("inf")

            ts = [threading.Thread(target=poll, args=(n,)) for n in ("a", "b")]
            [t.start() for t in ts]
            [t.join() for t in ts]
            for n in ("a", "b"):
                delays[n].append(done[n])
            _ = t0, r
        print(
            "revocation delay after the CLI returned (s):",
            {n: [round(x, 3) for x in v] for n, v in delays.items()},
        )

        # (b) backend of A refused (proxy killed), key revoked meanwhile through the CLI
        for mode in ("kill", "freeze"):
            key = new_key()
            kid = key.split("_")[1]
            tries = []
            t_try = time.monotonic()
            while time.monotonic() - t_try < 10:
                tries.append(ask("a", key))
                if tries[-1][0] == 200:
                    break
                time.sleep(0.1)
            print(
                f"[{mode}] a fresh key on A before the outage: {len(tries)} tries, statuses",
                Counter((x[0], x[2]) for x in tries),
                f"over {time.monotonic() - t_try:.2f}s",
            )
            base_live = []
            for _ in range(20):
                t = time.monotonic()
                httpx.get(f"{servers['a'].base_url}/v2/health/live", timeout=30)
                base_live.append(time.monotonic() - t)
            print(f"   baseline /v2/health/live median {statistics.median(base_live):.3f}s")
            seen: list[tuple[float, int, float, str]] = []
            live: list[float] = []
            stop = threading.Event()

            def livewatch() -> None:
                while not stop.is_set():
                    t = time.monotonic()
                    try:
                        httpx.get(f"{servers['a'].base_url}/v2/health/live", timeout=30)
                    except httpx.TransportError:
                        pass
                    live.append(time.monotonic() - t)
                    time.sleep(0.02)

            lw = threading.Thread(target=livewatch)
            lw.start()
            t_out = time.monotonic()
            if mode == "kill":
                proxies["a"].kill()
            else:
                proxies["a"].freeze(True)
            revoked_at: list[float] = []

            def revoke_later() -> None:
                time.sleep(0.5)
                cli(configs["c"], "keys", "revoke", kid)
                revoked_at.append(round(time.monotonic() - t_out, 3))

            rv = threading.Thread(target=revoke_later)
            rv.start()
            while time.monotonic() - t_out < 8:
                s, dt, code = ask("a", key, timeout=30)
                seen.append((round(time.monotonic() - t_out, 3), s, round(dt, 3), code))
                time.sleep(0.02)
            rv.join()
            if mode == "kill":
                proxies["a"].start()
            else:
                proxies["a"].freeze(False)
            t_back = time.monotonic()
            after = []
            while time.monotonic() - t_back < 3:
                s, dt, code = ask("a", key)
                after.append((round(time.monotonic() - t_back, 3), s, code))
                time.sleep(0.05)
            stop.set()
            lw.join()
            print(f"--- backend of A {mode}: revoked through the CLI at +{revoked_at}s")
            print("   statuses during outage:", Counter((s, c) for _, s, _, c in seen))
            print(
                "   last 200 at +",
                max([t for t, s, _, _ in seen if s == 200], default=None),
                "s;",
                "slowest answer",
                max(dt for _, _, dt, _ in seen),
                "s",
            )
            print(
                "   after the backend came back:", Counter((s, c) for _, s, c in after), "first:", after[:2]
            )
            print(
                f"   /v2/health/live latency during: median {statistics.median(live):.3f}s max {max(live):.3f}s n={len(live)}"
            )
        # (c) CLI against a dead backend, DSN with a password
        dead = base / "c" / "dead.toml"
        pw = "Sup3rS3cretPw"
        if backend == "redis":
            st = f'backend = "redis"\nredis_url = "redis://:{pw}@127.0.0.1:1/14"\nredis_prefix = "{prefix}"\n'
        else:
            st = f'backend = "postgres"\npostgres_dsn = "postgresql://postgres:{pw}@127.0.0.1:1/postgres"\npostgres_table = "{table}"\n'
        dead.write_text(text.replace('[state]\nbackend = "sqlite"\n', f"[state]\n{st}"))
        for args in (
            ("keys", "list"),
            ("keys", "revoke", "0123456789abcdef"),
            ("incidents", "list"),
            ("check",),
        ):
            r = (
                cli(dead, *args)
                if len(args) > 1
                else subprocess.run(
                    [*BASTION, "check", "--config", str(dead)], capture_output=True, text=True, timeout=120
                )
            )
            out = r.stdout + r.stderr
            print(
                f"CLI {' '.join(args)} on dead backend: rc={r.returncode} traceback={'Traceback' in out} "
                f"password_shown={pw in out} :: {out.strip().splitlines()[-1][:160] if out.strip() else ''}"
            )
        if backend == "postgres":
            # (d) another session holds an ACCESS EXCLUSIVE lock on the records table for 6 s
            import psycopg

            key = new_key()
            assert ask("a", key)[0] == 200
            with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres") as conn:
                names = [
                    r[0]
                    for r in conn.execute(
                        "SELECT tablename FROM pg_tables WHERE tablename LIKE %s", (table + "%",)
                    ).fetchall()
                ]
                print("tables:", names)
                conn.execute(f'LOCK TABLE "{table}_records_counters" IN ACCESS EXCLUSIVE MODE')
                t0 = time.monotonic()
                results: list[tuple[str, float, object]] = []

                def probe(kind: str) -> None:
                    t = time.monotonic()
                    try:
                        if kind == "live":
                            s = httpx.get(f"{servers['a'].base_url}/v2/health/live", timeout=30).status_code
                        else:
                            s = ask("a", key, timeout=30)[0]
                    except httpx.TransportError as e:
                        s = type(e).__name__
                    results.append((kind, round(time.monotonic() - t, 2), s))

                time.sleep(0.3)
                ths = [threading.Thread(target=probe, args=(k,)) for k in ("infer", "live", "live")]
                for th in ths:
                    th.start()
                    time.sleep(0.3)
                time.sleep(6 - (time.monotonic() - t0))
                conn.rollback()
                for th in ths:
                    th.join()
                print("while another session held a table lock 6 s:", results)
    finally:
        for s in servers.values():
            s.stop()
        for p in proxies.values():
            try:
                p.freeze(False)
                p.kill()
            except Exception:
                pass
        if backend == "redis":
            import redis

            r = redis.Redis.from_url("redis://127.0.0.1:6379/14")
            ks = list(r.scan_iter(match=f"{prefix}*"))
            if ks:
                r.delete(*ks)
            print("cleaned redis keys:", len(ks))
        else:
            import psycopg

            with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
                for (n,) in conn.execute(
                    "SELECT tablename FROM pg_tables WHERE tablename LIKE %s", (table + "%",)
                ).fetchall():
                    conn.execute(f'DROP TABLE IF EXISTS "{n}"')
            print("dropped tables", table + "*")


if __name__ == "__main__":
    main()
