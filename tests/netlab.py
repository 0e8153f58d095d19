"""Hosts on a network, on one machine: network namespaces on a bridge, HAProxy in front, a Redis of
their own. Used by tests/e2e/test_network_replicas.py and bench/scaling.py.

    root namespace                         namespace <tag>-r1 ... <tag>-rN
    bridge bb<hex> 10.A.B.1/24  ── veth ──  10.A.B.11 ... 10.A.B.(10+N): a Bastion replica each
      redis-server 10.A.B.1:<port>       (the replicas' own Redis: stopping it disturbs no other test)
      HAProxy 127.0.0.1:<port>  → the replicas, roundrobin, health checks on /v2/health/ready
      HAProxy 10.A.B.1:<port>   → PostgreSQL 127.0.0.1:5432 (tcp: PostgreSQL listens on loopback only,
                                   which another namespace cannot reach)

A replica's loopback is its own: it reaches Redis and PostgreSQL only through its veth, as a host
reaches them through its network. Names carry the creating process's id and a random tag, so that
runs never collide, and `sweep_leftovers` removes what a killed run left behind (its processes, its
namespaces and its bridge). Everything is torn down on exit, failures included.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

_ALIAS = "bastion-netlab pid="
_NS = re.compile(r"^bastion-(\d+)-[0-9a-f]+-r\d+$")
REPLICA_PORT = 8000


class NetlabError(AssertionError):
    """The lab could not be built (no permission for `ip netns`, a missing program): the reason, loudly."""


def _ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if done.returncode != 0:
        hint = (
            " (the network test needs root: CAP_NET_ADMIN, CAP_SYS_ADMIN)"
            if "not permitted" in done.stderr
            else ""
        )
        raise NetlabError(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}{hint}")
    return done.stdout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_namespace_processes(namespace: str) -> None:
    """SIGKILL every process in `namespace` (all of them started by a lab: the namespace is a lab's)."""
    done = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True, timeout=20)
    for pid in done.stdout.split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)


# Processes a lab starts in the root namespace (HAProxy, Redis) are listed here, one file per lab
# named after the creating process, so that a later run can end them if that process was killed.
REGISTRY = Path(tempfile.gettempdir()) / "bastion-netlab"


def _program(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


def sweep_leftovers() -> None:
    """Remove what labs whose creating process is gone (a run killed before its teardown) left:
    their root-namespace processes (each checked to still run the program it was started as),
    their namespaces with the processes in them, and their bridges."""
    for listing in REGISTRY.glob("*.pids") if REGISTRY.is_dir() else []:
        if _alive(int(listing.name.split("-")[0])):
            continue
        for line in listing.read_text().splitlines():
            pid, program = line.split(" ", 1)
            if _program(int(pid)).startswith(program):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        listing.unlink(missing_ok=True)
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=20).stdout
    for line in namespaces.splitlines():
        name = line.split()[0] if line.strip() else ""
        match = _NS.match(name)
        if match and not _alive(int(match.group(1))):
            _kill_namespace_processes(name)
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20)
    links = subprocess.run(["ip", "-o", "link", "show", "type", "bridge"], capture_output=True, text=True)
    for line in links.stdout.splitlines():
        alias = re.search(rf"alias {re.escape(_ALIAS)}(\d+)", line)
        if alias and not _alive(int(alias.group(1))):
            name = line.split(":")[1].strip().split("@")[0]
            subprocess.run(["ip", "link", "del", name], capture_output=True, timeout=20)


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.200.0.0/13 that no interface of this machine uses."""
    used = [
        ipaddress.ip_interface(a).network
        for a in re.findall(
            r"inet (\S+)", subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True).stdout
        )
    ]
    for _ in range(100):
        candidate = ipaddress.IPv4Network(f"10.{200 + secrets.randbelow(8)}.{secrets.randbelow(256)}.0/24")
        if not any(candidate.overlaps(u) for u in used):
            return candidate
    raise NetlabError("no free /24 in 10.200.0.0/13 for the lab's bridge")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise NetlabError(f"nothing listens on {host}:{port} after {timeout} s")


def stop_process(process: subprocess.Popen[bytes], *, timeout: float = 10.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Lab:
    """The lab's names and addresses, and every process it started (stopped at teardown)."""

    tag: str
    bridge: str
    host_ip: str  # the root namespace's address on the bridge: Redis and the PostgreSQL forward
    namespaces: list[str]
    addresses: list[str]  # one per namespace
    root: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    redis_port: int = 0
    redis_process: subprocess.Popen[bytes] | None = None

    def spawn(
        self, namespace: str | None, argv: Sequence[str], log: Path, **env: str
    ) -> subprocess.Popen[bytes]:
        """Start `argv` in `namespace` (None: the root namespace); output to `log`. `ip netns exec`
        execs the program, so the returned process is the program itself (its pid is the program's)."""
        prefix = ["ip", "netns", "exec", namespace] if namespace else []
        with log.open("ab") as out:
            process = subprocess.Popen(
                [*prefix, *argv], stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env}
            )
        self.processes.append(process)
        if namespace is None:  # a namespace's processes are found through the namespace
            REGISTRY.mkdir(mode=0o700, exist_ok=True)
            with (REGISTRY / f"{self.tag}.pids").open("a") as listing:
                listing.write(f"{process.pid} {argv[0]}\n")
        return process

    # --- the replicas' Redis -------------------------------------------------------------------------

    @property
    def redis_url(self) -> str:
        return f"redis://{self.host_ip}:{self.redis_port}/0"

    def start_redis(self) -> None:
        """A redis-server bound to the bridge address only. Its data survive `stop_redis` (saved on
        shutdown, loaded on start), as a managed Redis's would survive a restart."""
        if not self.redis_port:
            self.redis_port = free_port(self.host_ip)
        argv = [
            "redis-server", "--bind", self.host_ip, "--port", str(self.redis_port), "--dir", str(self.root),
            "--dbfilename", "redis.rdb", "--save", "", "--appendonly", "no", "--protected-mode", "no",
        ]  # fmt: skip
        self.redis_process = self.spawn(None, argv, self.root / "redis.log")
        wait_for_port(self.host_ip, self.redis_port)

    def stop_redis(self) -> None:
        """SHUTDOWN SAVE, then wait until the port is closed."""
        assert self.redis_process is not None
        subprocess.run(
            ["redis-cli", "-h", self.host_ip, "-p", str(self.redis_port), "shutdown", "save"],
            capture_output=True,
            timeout=10,
        )
        self.redis_process.wait(timeout=10)

    # --- HAProxy --------------------------------------------------------------------------------------

    def start_haproxy(self, backends: Sequence[str], *, port: int, postgres_port: int | None = None) -> None:
        """HAProxy on 127.0.0.1:`port`, roundrobin over `backends` (host:port), health checks on
        /v2/health/ready; with `postgres_port`, also a TCP forward host_ip:postgres_port →
        127.0.0.1:5432."""
        cfg = self.root / f"haproxy-{port}.cfg"
        sock = self.root / f"haproxy-{port}.sock"
        cfg.write_text(
            haproxy_config(
                backends, port=port, host_ip=self.host_ip, postgres_port=postgres_port, stats_socket=sock
            )
        )
        check = subprocess.run(["haproxy", "-c", "-q", "-f", str(cfg)], capture_output=True, text=True)
        if check.returncode != 0:
            raise NetlabError(f"haproxy refused its configuration: {check.stderr.strip()}")
        self.spawn(None, ["haproxy", "-db", "-f", str(cfg)], self.root / f"haproxy-{port}.log")
        wait_for_port("127.0.0.1", port)
        if postgres_port is not None:
            wait_for_port(self.host_ip, postgres_port)

    def haproxy_stats(self, port: int) -> dict[str, dict[str, str]]:
        """HAProxy's counters for each replica ("r1", ...): its `show stat` row (status, stot,
        hrsp_2xx...), read from the stats socket."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.root / f"haproxy-{port}.sock"))
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        lines = data.decode().splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]
        return {r["svname"]: r for r in rows if r.get("pxname") == "replicas" and r["svname"].startswith("r")}

    def haproxy_servers(self, port: int) -> dict[str, str]:
        """Each replica's status as HAProxy sees it: {"r1": "UP", "r2": "DOWN", ...}."""
        return {name: row["status"] for name, row in self.haproxy_stats(port).items()}

    def wait_backends(self, port: int, up: int, timeout: float = 15.0) -> None:
        """Until exactly `up` of HAProxy's replicas are UP (it has seen them pass their checks)."""
        deadline = time.monotonic() + timeout
        seen: dict[str, str] = {}
        while time.monotonic() < deadline:
            seen = self.haproxy_servers(port)
            if sum(status == "UP" for status in seen.values()) == up:
                return
            time.sleep(0.05)
        raise NetlabError(f"HAProxy on port {port}: wanted {up} replicas UP, has {seen} after {timeout} s")

    # --- Bastion replicas -----------------------------------------------------------------------------

    def replica_url(self, index: int) -> str:
        return f"http://{self.addresses[index]}:{REPLICA_PORT}"

    def start_replica(self, index: int, config: Path, *extra: str) -> subprocess.Popen[bytes]:
        """`bastion serve` on host `index` (its namespace, its address, port 8000); returns once it
        answers liveness. Raises NetlabError with its log when it exits or is not up in 60 s."""
        log = self.root / f"replica-{index + 1}.log"
        argv = [
            sys.executable, "-m", "bastion.cli", "serve", "--config", str(config),
            "--host", self.addresses[index], "--port", str(REPLICA_PORT), "--log-level", "warning", *extra,
        ]  # fmt: skip
        process = self.spawn(self.namespaces[index], argv, log, PYTHONUNBUFFERED="1")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise NetlabError(f"replica {index + 1} exited: {log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.replica_url(index)}/v2/health/live", timeout=1).status_code == 200:
                    return process
            except httpx.TransportError:
                time.sleep(0.1)
        raise NetlabError(f"replica {index + 1} not up in 60 s: {log.read_text()[-3000:]}")

    def kill_host(self, index: int) -> None:
        """SIGKILL every process on host `index`: a machine that loses power, no shutdown of any kind."""
        _kill_namespace_processes(self.namespaces[index])
        for process in self.processes:
            if process.args[3:4] == [self.namespaces[index]]:  # type: ignore[index]
                process.wait(timeout=10)

    # --- teardown -------------------------------------------------------------------------------------

    def teardown(self) -> None:
        for process in reversed(self.processes):
            with contextlib.suppress(Exception):
                stop_process(process, timeout=5)
        for namespace in self.namespaces:
            _kill_namespace_processes(namespace)  # anything a replica started (workers) and left
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=20)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, timeout=20)
        (REGISTRY / f"{self.tag}.pids").unlink(missing_ok=True)


def haproxy_config(
    backends: Sequence[str], *, port: int, host_ip: str, postgres_port: int | None, stats_socket: Path
) -> str:
    """HAProxy's configuration: roundrobin, active health checks on readiness every 200 ms (down after
    2 failures, up after 2 passes), bounded timeouts. A request is re-sent to another replica only
    when its connection could not be made (`retry-on conn-failure`): one that reached a replica may
    have been answered and counted there, and is never sent twice."""
    servers = "\n".join(f"  server r{i + 1} {b} check" for i, b in enumerate(backends))
    text = f"""global
  maxconn 4096
  stats socket {stats_socket} mode 600 level user

defaults
  mode http
  timeout connect 1s
  timeout client 30s
  timeout server 30s
  timeout check 1s
  timeout http-request 10s
  timeout queue 5s
  retries 2
  option redispatch
  retry-on conn-failure

frontend bastion
  bind 127.0.0.1:{port}
  default_backend replicas

backend replicas
  balance roundrobin
  option httpchk GET /v2/health/ready
  http-check expect status 200
  default-server inter 200ms fall 2 rise 2
{servers}
"""
    if postgres_port is not None:
        text += f"""
listen postgres
  mode tcp
  bind {host_ip}:{postgres_port}
  timeout client 1h
  timeout server 1h
  server pg 127.0.0.1:5432
"""
    return text


@contextlib.contextmanager
def network_lab(hosts: int, root: Path) -> Iterator[Lab]:
    """`hosts` network namespaces on one new bridge, each with one address; yields the `Lab` and
    tears it all down afterwards (processes, namespaces, bridge), whatever happened.

    Raises NetlabError (an AssertionError: the test fails, it does not skip) when the machine does
    not let this process create namespaces or links: the network test needs root (CAP_NET_ADMIN,
    CAP_SYS_ADMIN)."""
    sweep_leftovers()
    tag = f"{os.getpid()}-{secrets.token_hex(3)}"
    short = secrets.token_hex(4)  # interface names hold 15 characters
    subnet = _free_subnet()
    hosts_ips = [str(subnet.network_address + n) for n in range(1, hosts + 12)]
    lab = Lab(
        tag=tag,
        bridge=f"bb{short}",
        host_ip=hosts_ips[0],
        namespaces=[f"bastion-{tag}-r{i + 1}" for i in range(hosts)],
        addresses=hosts_ips[10 : 10 + hosts],
        root=root,
    )
    root.mkdir(parents=True, exist_ok=True)
    try:
        _ip("link", "add", lab.bridge, "type", "bridge")
        _ip("link", "set", lab.bridge, "alias", f"{_ALIAS}{os.getpid()}")
        _ip("addr", "add", f"{lab.host_ip}/24", "dev", lab.bridge)
        _ip("link", "set", lab.bridge, "up")
        for i, (namespace, address) in enumerate(zip(lab.namespaces, lab.addresses, strict=True)):
            outside, inside = f"vh{short}{i}", f"vn{short}{i}"
            _ip("netns", "add", namespace)
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            _ip("link", "set", inside, "netns", namespace)
            _ip("link", "set", outside, "master", lab.bridge, "up")
            _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", inside)
            _ip("-n", namespace, "link", "set", inside, "up")
            _ip("-n", namespace, "link", "set", "lo", "up")
        yield lab
    finally:
        lab.teardown()
