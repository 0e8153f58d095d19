"""The HTTP front end, measured: which limits hold under each attack, and what they cost.

Candidates serve the same demo build and the same Bastion application:

- old:       uvicorn + httptools as `bastion serve` ran it before (limit_concurrency=1024, keep-alive 5 s)
- bastion:   `bastion serve` today (bastion.http.frontend over httptools, LoadShedder)
- h11:       uvicorn's h11 protocol with h11_max_incomplete_event_size, LoadShedder
- hypercorn: hypercorn (h11) with h11_max_incomplete_size, keep_alive_timeout, read_timeout, LoadShedder
- granian:   granian (Rust, hyper) with http1 buffer and header-read timeout, backpressure

Part 1 runs each attack against each candidate (deadlines of 3 s where the candidate has them)
and prints whether the limit held. Part 2 runs wrk on the full-defense infer path, rounds
alternating between candidates, each server pinned to CPU 0 and wrk to CPU 1.

    .venv/bin/python bench/frontend.py [--candidates old,bastion,h11,hypercorn,granian]
        [--attacks-only | --load-only] [--seconds 10] [--rounds 3] [--connections 16]

A candidate's server process is this file: `frontend.py --serve NAME --config C --port P`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from load import bench_policy, cpu_seconds, create_key, free_port, run_wrk  # noqa: E402

DEADLINE = 3.0  # head, body and keep-alive deadlines given to every candidate that has them
HEADER_BYTES = 32768
CANDIDATES = ["old", "bastion", "h11", "hypercorn", "granian"]

# The server side: one process per candidate, the same application in each.


def _service(config_path: Path) -> tuple[Any, Any, Any]:
    from bastion.config import load_config
    from bastion.http.app import BastionApp
    from bastion.service import Bastion

    config = load_config(config_path)
    sys.setswitchinterval(0.0005)  # as cmd_serve does
    service = Bastion(config, config_path=config_path)
    return config, service, BastionApp(service)


def serve(name: str, config_path: Path, port: int) -> None:
    if name == "bastion":
        from bastion.cli import main

        raise SystemExit(
            main(["serve", "--config", str(config_path), "--port", str(port), "--log-level", "warning"])
        )
    if name == "granian":
        os.environ["BASTION_BENCH_CONFIG"] = str(config_path)
        os.execvp(  # noqa: S606 (our own interpreter, fixed arguments)
            sys.executable,
            [
                sys.executable,
                "-m",
                "granian",
                "--interface",
                "asgi",
                "--factory",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
                "--log-level",
                "warning",
                "--http",
                "1",
                "--http1-buffer-size",
                str(HEADER_BYTES),
                "--http1-header-read-timeout",
                str(int(DEADLINE * 1000)),
                "--backpressure",
                "1024",
                "frontend:granian_app",
            ],
        )
    import uvicorn

    from bastion.http.shedding import LoadShedder

    _, service, app = _service(config_path)
    try:
        if name == "old":
            uv = uvicorn.Config(
                app,
                port=port,
                log_level="warning",
                access_log=False,
                lifespan="on",
                server_header=False,
                proxy_headers=False,
                timeout_keep_alive=5,
                limit_concurrency=1024,
                timeout_graceful_shutdown=10,
            )
            uvicorn.Server(uv).run()
        elif name == "h11":
            uv = uvicorn.Config(
                LoadShedder(app, max_in_flight=1024),
                port=port,
                http="h11",
                h11_max_incomplete_event_size=HEADER_BYTES,
                log_level="warning",
                access_log=False,
                lifespan="on",
                server_header=False,
                proxy_headers=False,
                timeout_keep_alive=int(DEADLINE),
                timeout_graceful_shutdown=10,
            )
            uvicorn.Server(uv).run()
        elif name == "hypercorn":
            import uvloop
            from hypercorn.asyncio import serve as hypercorn_serve
            from hypercorn.config import Config as HypercornConfig

            hc = HypercornConfig()
            hc.bind = [f"127.0.0.1:{port}"]
            hc.h11_max_incomplete_size = HEADER_BYTES
            hc.keep_alive_timeout = DEADLINE
            hc.read_timeout = int(DEADLINE)
            hc.loglevel = "WARNING"
            hc.accesslog = None
            uvloop.install()
            asyncio.run(hypercorn_serve(LoadShedder(app, max_in_flight=1024), hc))  # type: ignore[arg-type]
        else:
            raise SystemExit(f"unknown candidate {name}")
    finally:
        service.close()


def granian_app() -> Any:
    from bastion.http.shedding import LoadShedder

    _, _, app = _service(Path(os.environ["BASTION_BENCH_CONFIG"]))
    return LoadShedder(app, max_in_flight=1024)


# The client side


class Server:
    def __init__(self, name: str, config: Path, cpu: str | None = None) -> None:
        self.name, self.port = name, free_port()
        cmd = [sys.executable, __file__, "--serve", name, "--config", str(config), "--port", str(self.port)]
        if cpu is not None:
            cmd = ["taskset", "-c", cpu, *cmd]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT / "bench"
        )
        for _ in range(900):
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/v2/health/live", timeout=1).status_code == 200:
                    return
            if self.proc.poll() is not None:
                raise SystemExit(f"{name} exited at start")
            time.sleep(0.1)
        self.stop()
        raise SystemExit(f"{name} did not start")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rss_mib(self) -> float:
        """Resident memory of the server and its children (granian's worker), MiB."""
        total = 0
        for pid in self._pids():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        return total / 1024

    def _pids(self) -> list[int]:
        pids = [self.proc.pid]
        with contextlib.suppress(OSError):
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            pids += [int(p) for p in children]
        return pids

    def cpu_seconds(self) -> float:
        """User + system CPU of the server and its children (granian's worker)."""
        total = 0.0
        for pid in self._pids():
            with contextlib.suppress(OSError):
                total += cpu_seconds(pid)
        return total

    def connect(self, timeout: float = 10.0) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """(closed by the server within `seconds`, the first bytes it sent)."""
    sock.settimeout(0.2)
    end, got = time.monotonic() + seconds, b""
    while time.monotonic() < end:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            return True, got[:12]
        if not chunk:
            return True, got[:12]
        got += chunk
    return False, got[:12]


def _send_until_closed(sock: socket.socket, pieces: Callable[[], bytes], limit: int, seconds: float) -> int:
    sent, end = 0, time.monotonic() + seconds
    with contextlib.suppress(OSError):
        while sent < limit and time.monotonic() < end:
            sent += sock.send(pieces())
    return sent


def attack_big_header(s: Server, ctx: dict[str, Any]) -> tuple[bool, str]:
    before = s.rss_mib()
    with s.connect() as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Huge: ")
        line = b"a" * 65536
        sent = _send_until_closed(sock, lambda: line, 64 << 20, 30)
        peak = s.rss_mib() - before
        _, first = _closed_within(sock, 2)
    # Loopback socket buffers take a few MiB the server never read; a reading server takes all 64.
    held = sent < (16 << 20) and peak < 8
    return held, f"sent {sent >> 20} MiB before the close, RSS +{peak:.0f} MiB, answer {first!r}"


def attack_many_headers(s: Server, ctx: dict[str, Any]) -> tuple[bool, str]:
    with s.connect() as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")
        block = b"".join(b"x-%d: b\r\n" % i for i in range(1000))
        _send_until_closed(sock, lambda: block, 100 * len(block), 30)
        with contextlib.suppress(OSError):
            sock.sendall(b"\r\n")
        _, first = _closed_within(sock, 5)
    reached = first.startswith(b"HTTP/1.1 200")
    return not reached, f"100,000 fields: {'reached the app' if reached else 'refused'}, answer {first!r}"


def attack_slowloris(s: Server, ctx: dict[str, Any]) -> tuple[bool, str]:
    with s.connect() as sock:
        t0 = time.monotonic()
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\n")
        closed = False
        for i in range(20):  # one header line a second, for up to 20 s
            closed, _ = _closed_within(sock, 1)
            if closed:
                break
            with contextlib.suppress(OSError):
                sock.sendall(b"x-%d: a\r\n" % i)
        took = time.monotonic() - t0
    return closed and took < 3 * DEADLINE, f"{'closed' if closed else 'still open'} after {took:.1f} s"


def attack_idle_flood(s: Server, ctx: dict[str, Any]) -> tuple[bool, str]:
    socks = []
    try:
        for _ in range(1100):
            socks.append(socket.create_connection(("127.0.0.1", s.port)))
        time.sleep(0.3)
        t0 = time.monotonic()
        try:
            health = httpx.get(f"{s.url}/v2/health/live", timeout=5)
            took, status = time.monotonic() - t0, health.status_code
        except httpx.TransportError as e:
            took, status = time.monotonic() - t0, type(e).__name__
        try:
            keyed = httpx.post(
                f"{s.url}/v2/models/breast-cancer/infer",
                content=ctx["body"],
                headers=ctx["headers"],
                timeout=5,
            ).status_code
        except httpx.TransportError as e:
            keyed = type(e).__name__  # type: ignore[assignment]
        time.sleep(3 * DEADLINE)
        still_open = 0
        for sock in socks:
            try:
                still_open += sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
            except BlockingIOError:
                still_open += 1
            except OSError:
                pass
    finally:
        for sock in socks:
            sock.close()
    held = status == 200 and took < 1 and keyed == 200 and still_open == 0
    return held, (
        f"health {status} in {took * 1000:.0f} ms, keyed infer {keyed}, "
        f"{still_open} of 1100 still open after {3 * DEADLINE:.0f} s"
    )


def attack_slow_body(s: Server, ctx: dict[str, Any]) -> tuple[bool, str]:
    body = ctx["body"]
    head = (
        f"POST /v2/models/breast-cancer/infer HTTP/1.1\r\nHost: x\r\nAuthorization: {ctx['headers']['Authorization']}"
        f"\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with s.connect() as sock:
        t0 = time.monotonic()
        sock.sendall(head + body[:10])
        closed, first = _closed_within(sock, 20)
        took = time.monotonic() - t0
    return (
        closed and took < 3 * DEADLINE,
        f"{'closed' if closed else 'open'} after {took:.1f} s, answer {first!r}",
    )


def attack_chunk_extensions(s: Server, ctx: dict[str, Any]) -> tuple[bool, str]:
    head = (
        f"POST /v2/models/breast-cancer/infer HTTP/1.1\r\nHost: x\r\nAuthorization: {ctx['headers']['Authorization']}"
        "\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    piece = b"1;x=" + b"a" * 8192 + b"\r\nx\r\n"  # one byte of body, 8 KiB of framing
    with s.connect() as sock:
        sock.sendall(head)
        sent = _send_until_closed(sock, lambda: piece, 64 << 20, 30)
        _, first = _closed_within(sock, 3)
    return sent < (16 << 20), f"sent {sent / (1 << 20):.1f} MiB of framing before the close, answer {first!r}"


ATTACKS = [
    ("64 MiB header line", attack_big_header),
    ("100,000 header fields", attack_many_headers),
    ("slowloris head", attack_slowloris),
    ("1,100 idle conns + probes", attack_idle_flood),
    ("slow body", attack_slow_body),
    ("chunk-extension flood", attack_chunk_extensions),
]


def deployment(work: Path) -> tuple[Path, bytes, str]:
    from bastion.demo import build_demo, infer_request

    build = build_demo(work / "demo")
    text = bench_policy(build.config_path)
    limits = f"head_timeout_seconds = {DEADLINE}\nbody_timeout_seconds = {DEADLINE}\nkeep_alive_seconds = {DEADLINE}\n"
    text = text.replace('state_dir = "state"\n', f'state_dir = "state"\n{limits}', 1)
    build.config_path.write_text(text)
    key = create_key(build.config_path)
    return build.config_path, json.dumps(infer_request(build.features[:1])).encode(), key


def run_attacks(config: Path, candidates: list[str], body: bytes, key: str) -> None:
    ctx = {"body": body, "headers": {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}}
    table: dict[str, dict[str, str]] = {}
    for name in candidates:
        server = Server(name, config)
        try:
            for attack, run in ATTACKS:
                if server.proc.poll() is not None:
                    held, detail = False, "server had exited"
                else:
                    try:
                        held, detail = run(server, ctx)
                    except Exception as e:  # an attack that breaks the client is a finding, not a crash
                        held, detail = False, f"{type(e).__name__}: {e}"
                table.setdefault(attack, {})[name] = "holds" if held else "FAILS"
                print(f"{name:<10} {attack:<26} {'holds' if held else 'FAILS':<6} {detail}", flush=True)
        finally:
            server.stop()
    print("\n| attack | " + " | ".join(candidates) + " |")
    print("|---|" + "---|" * len(candidates))
    for attack, _ in ATTACKS:
        print(f"| {attack} | " + " | ".join(table[attack][n] for n in candidates) + " |")


def run_load(config: Path, candidates: list[str], body: bytes, key: str, args: argparse.Namespace) -> None:
    body_path = config.parent / "request.json"
    body_path.write_bytes(body)
    results: dict[str, list[dict[str, float]]] = {n: [] for n in candidates}
    for rnd in range(args.rounds):
        for name in candidates:
            server = Server(name, config, cpu="0")
            try:
                url = f"{server.url}/v2/models/breast-cancer/infer"
                run_wrk(url, body_path, key, 2, args.connections, "infer.lua")  # warm-up
                cpu0 = server.cpu_seconds()
                r = run_wrk(url, body_path, key, args.seconds, args.connections, "infer.lua")
                # CPU per request is steadier than req/s on a shared machine.
                r["cpu_us"] = (server.cpu_seconds() - cpu0) / max(1.0, r["rps"] * args.seconds) * 1e6
            finally:
                server.stop()
            results[name].append(r)
            print(
                f"round {rnd + 1} {name:<10} {r['rps']:8.0f} req/s  p50 {r['p50']:6.2f} ms  p99 {r['p99']:6.2f} ms"
                f"  CPU {r['cpu_us']:.0f} us/req  non-2xx {r['errors']:.0f}",
                flush=True,
            )
    print(f"\n| server | req/s (median of {args.rounds}) | p50 ms | p99 ms | CPU µs/req |")
    print("|---|---|---|---|---|")
    for name in candidates:
        rs = results[name]
        print(
            f"| {name} | {statistics.median(r['rps'] for r in rs):.0f} | "
            f"{statistics.median(r['p50'] for r in rs):.2f} | {statistics.median(r['p99'] for r in rs):.2f} | "
            f"{statistics.median(r['cpu_us'] for r in rs):.0f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--candidates", default=",".join(CANDIDATES))
    parser.add_argument("--load-candidates", default="old,bastion,h11,hypercorn,granian")
    parser.add_argument("--attacks-only", action="store_true")
    parser.add_argument("--load-only", action="store_true")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.config, args.port)
        return
    if not args.attacks_only and shutil.which("wrk") is None:
        raise SystemExit("wrk not found: `apt-get install wrk` (make bench does it)")
    work = Path(tempfile.mkdtemp(prefix="bastion-frontend-"))
    config, body, key = deployment(work)
    if not args.load_only:
        run_attacks(config, args.candidates.split(","), body, key)
    if not args.attacks_only:
        print()
        run_load(config, args.load_candidates.split(","), body, key, args)


if __name__ == "__main__":
    main()
