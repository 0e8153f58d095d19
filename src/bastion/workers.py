"""`bastion serve --workers N`: one supervisor, N worker processes sharing the server's port.

What each process does:

- The **supervisor** loads nothing but the policy file. It takes the state directory's lock
  (bastion.statedir), reserves the HTTP (and gRPC) port with a bound, non-listening
  `SO_REUSEPORT` socket, starts the workers, restarts a dead one with backoff, forwards SIGHUP
  (reload) to all and, on SIGTERM or SIGINT, stops them all (each drains its requests) and exits.
- Each **worker** is a fresh interpreter (`python -m bastion.workers`, not a fork: no model,
  thread pool or database connection is copied mid-use) running the whole server: every stage,
  its own audit writer, its own models. It inherits the lock's descriptor, so the directory stays
  locked while any process of the server lives, and a worker whose supervisor dies is sent
  SIGTERM by the kernel (`PR_SET_PDEATHSIG`). It opens its own listening socket on the port with
  `SO_REUSEPORT`.

Why one socket per worker (`SO_REUSEPORT`) rather than one listening socket inherited by all:
with a shared socket every worker's event loop is woken for each new connection and asyncio
accepts up to `backlog` connections per wake-up (`selector_events._accept_connection`), so the
loop that wins a burst takes all of it while the others stay idle. With `SO_REUSEPORT` the kernel
hashes each connection to one worker's own accept queue: an even spread by connection count, no
thundering herd. The cost: a worker killed with connections still in its accept queue resets
them (a shared queue would hand them to a sibling); the supervisor restarts it within a second.

A worker that is alive but hung (SIGSTOP, a C call that never returns, swap) keeps its listening
socket, and the kernel keeps queueing new connections on it: about 1/N of all connections would
hang. So each worker's event loop writes a byte to a pipe the supervisor holds every 0.5 s once it
listens (uvicorn's 0.1 s tick, so a blocked loop stops beating too); one silent for
`server.worker_heartbeat_timeout_seconds` is sent SIGKILL, counted in
`bastion_worker_heartbeat_kills_total`, and restarted with the usual backoff. Before its first beat
(models loading) a worker is not watched.

Several workers need a [state] backend they can share (`sqlite` on one host, `redis` or
`postgres`): `memory` is refused at start-up. Per worker: rate-limit buckets of failed
authentications per address, drift windows, the answer cache. Metrics are kept by each worker in
a private directory the supervisor makes (prometheus_client's multiprocess mode) and summed by
whichever worker answers `/metrics`. Shared: keys, quarantines,
isolations, incidents, measures, quotas and privacy budgets (leased from the ledger), query
auditing's histories (bastion.query_history), the audit chain.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from prometheus_client.multiprocess import mark_process_dead

from bastion.errors import ConfigError
from bastion.metrics import MULTIPROCESS_DIR

if TYPE_CHECKING:
    from collections.abc import Callable

    from bastion.statedir import StatePaths

log = logging.getLogger("bastion.workers")

_BACKOFF_FIRST = 0.5  # seconds before the first restart of a worker that died
_BACKOFF_MAX = 30.0
_HEALTHY_AFTER = 30.0  # a worker that lived this long died of something new: the backoff starts over
_STOP_GRACE = 20.0  # uvicorn drains for up to 10 s, gRPC 5 s, then the service closes its stores
_REFUSED_AT_START = (2, 3)  # the CLI's code for a refused configuration; uvicorn's for a failed lifespan
_PR_SET_PDEATHSIG = 1
_BEAT_EVERY = 0.5  # seconds between a worker's heartbeats
_KILLS_METRIC = "bastion_worker_heartbeat_kills"


@dataclass(slots=True)
class _Worker:
    index: int
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restart_at: float = 0.0
    quick_deaths: int = 0
    ever_up: bool = field(default=False)
    beats: int | None = None  # the read end of its heartbeat pipe
    last_beat: float | None = None  # None until its first beat: still loading, not watched


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _reserve(host: str, port: int) -> socket.socket:
    """A bound, non-listening SO_REUSEPORT socket on (host, port): the port stays this server's
    while workers come and go. A port already in use by anyone is refused first (a bind without
    SO_REUSEPORT), so two supervisors never share one silently."""
    family = _family(host)
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
        port = probe.getsockname()[1]  # port 0: the kernel's choice, kept for the workers
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    finally:
        probe.close()
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def worker_socket(host: str, port: int) -> socket.socket:
    """A worker's own socket on the shared port (SO_REUSEPORT), bound but not listening: the server
    listens once its models are loaded (asyncio's `create_server` does), so the kernel sends no
    connection to a worker still starting."""
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


class Supervisor:
    """Starts `count` workers with `worker_args` (JSON-able), restarts the dead, stops all on request."""

    def __init__(
        self,
        count: int,
        worker_args: dict[str, object],
        lock_fd: int,
        metrics_dir: str,
        heartbeat_timeout: float = 10.0,
    ) -> None:
        """`metrics_dir`: a private directory where the workers' metric values live (`/metrics`
        sums them, bastion.metrics). `heartbeat_timeout`: seconds of silence after which a worker
        that has beaten once is killed."""
        self._workers = [_Worker(i) for i in range(count)]
        self._metrics_dir = metrics_dir
        self._heartbeat_timeout = heartbeat_timeout
        self._kills = _supervisor_counter(
            metrics_dir, _KILLS_METRIC, "Workers killed by the supervisor for a missed heartbeat (hung)."
        )
        self._args = worker_args
        self._lock_fd = lock_fd
        self._stopping = False
        self._reload = False
        self.exit_code = 0

    def _spawn(self, worker: _Worker) -> None:
        env = {**os.environ, MULTIPROCESS_DIR: self._metrics_dir}
        beats, beat = os.pipe()
        os.set_blocking(beats, False)
        spec = {**self._args, "index": worker.index, "supervisor": os.getpid(), "heartbeat_fd": beat}
        command = [sys.executable, "-m", "bastion.workers", json.dumps(spec), str(self._lock_fd)]
        try:
            worker.process = subprocess.Popen(command, pass_fds=(self._lock_fd, beat), env=env)
        except BaseException:
            os.close(beats)
            raise
        finally:
            os.close(beat)  # the worker's copy is the only writer
        worker.beats, worker.last_beat = beats, None
        worker.started = time.monotonic()
        log.info("worker %d started (pid %d)", worker.index, worker.process.pid)

    def _on_stop(self, signum: int, _frame: FrameType | None) -> None:
        self._stopping = True

    def _on_hup(self, signum: int, _frame: FrameType | None) -> None:
        self._reload = True

    def run(self) -> int:
        """Until SIGTERM or SIGINT: keep every worker running. Returns the exit code."""
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        for worker in self._workers:
            self._spawn(worker)
        try:
            while not self._stopping:
                if self._reload:
                    self._reload = False
                    self._signal_all(signal.SIGHUP)
                self._tend(time.monotonic())
                time.sleep(0.1)
        finally:
            self._stop_all()
        return self.exit_code

    def _tend(self, now: float) -> None:
        for worker in self._workers:
            process = worker.process
            if process is not None:
                if now - worker.started >= _HEALTHY_AFTER:
                    worker.ever_up, worker.quick_deaths = True, 0
                code = process.poll()
                if code is None:
                    self._watch(worker, process, now)
                    continue
                worker.process = None
                self._close_beats(worker)
                # Its gauges leave /metrics; its counters stay in the totals (they never go down).
                mark_process_dead(process.pid, self._metrics_dir)  # type: ignore[no-untyped-call]
                if code in _REFUSED_AT_START and not any(w.ever_up for w in self._workers):
                    # The configuration or a model is refused: every restart would be refused alike.
                    log.error("worker %d refused to start (exit %d): stopping", worker.index, code)
                    self.exit_code, self._stopping = code, True
                    return
                delay = min(_BACKOFF_MAX, _BACKOFF_FIRST * 2**worker.quick_deaths)
                worker.quick_deaths += 1
                worker.restart_at = now + delay
                log.warning("worker %d died (exit %d); restarting in %.1f s", worker.index, code, delay)
            elif now >= worker.restart_at:
                self._spawn(worker)

    def _watch(self, worker: _Worker, process: subprocess.Popen[bytes], now: float) -> None:
        """Reads the worker's beats; kills it (SIGKILL: a stopped or hung process takes no SIGTERM)
        after `heartbeat_timeout` seconds without one. The next `_tend` reaps and restarts it."""
        if worker.beats is None:
            return
        try:
            if os.read(worker.beats, 4096):  # bytes queued while we slept are beats too
                worker.last_beat = now
        except BlockingIOError:
            pass
        if worker.last_beat is None or now - worker.last_beat < self._heartbeat_timeout:
            return
        log.error(
            "worker %d (pid %d) sent no heartbeat for %.1f s (hung): killed",
            worker.index,
            process.pid,
            now - worker.last_beat,
        )
        process.kill()
        worker.last_beat = None
        self._kills.inc(1)

    @staticmethod
    def _close_beats(worker: _Worker) -> None:
        if worker.beats is not None:
            os.close(worker.beats)
            worker.beats = None

    def _signal_all(self, signum: int) -> None:
        for worker in self._workers:
            if worker.process is not None and worker.process.poll() is None:
                worker.process.send_signal(signum)

    def _stop_all(self) -> None:
        self._signal_all(signal.SIGTERM)  # each worker drains its requests, then closes its stores
        deadline = time.monotonic() + _STOP_GRACE
        for worker in self._workers:
            if worker.process is None:
                continue
            try:
                worker.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker %d did not stop in %.0f s: killed", worker.index, _STOP_GRACE)
                worker.process.kill()
                worker.process.wait()
        for worker in self._workers:
            self._close_beats(worker)
        log.info("all workers stopped")


class _Counter:
    """What the supervisor needs of a counter: `inc`."""

    def __init__(self, value: object) -> None:
        self._value = value

    def inc(self, amount: float) -> None:
        self._value.inc(amount)  # type: ignore[attr-defined]


def _supervisor_counter(metrics_dir: str, name: str, documentation: str) -> _Counter:
    """A counter the supervisor keeps in the workers' metrics directory (its own file, by its PID),
    so whichever worker answers `/metrics` includes it. prometheus_client chose its value class at
    import, without the directory: the multiprocess one is asked for here explicitly."""
    from prometheus_client.values import MultiProcessValue

    previous = os.environ.get(MULTIPROCESS_DIR)
    os.environ[MULTIPROCESS_DIR] = metrics_dir  # read when the value's file is opened
    try:
        value_class = MultiProcessValue()  # type: ignore[no-untyped-call]
        value = value_class("counter", name, name + "_total", (), (), documentation)
    finally:
        if previous is None:
            del os.environ[MULTIPROCESS_DIR]
        else:
            os.environ[MULTIPROCESS_DIR] = previous
    return _Counter(value)


def supervise(args: argparse.Namespace) -> int:
    """`bastion serve --workers N` (N > 1). Raises ConfigError for a policy file or state backend
    that cannot serve several workers, OSError naming the address when a port is taken."""
    from bastion.config import load_config
    from bastion.logs import configure as configure_logging
    from bastion.statedir import StatePaths, lock_state_dir, make_private_dir

    config = load_config(args.config)
    configure_logging(config.logging.format, replace_all=True)
    if config.state.backend == "memory":
        raise ConfigError(
            f"{args.config}: state.backend: 'memory' cannot be shared by {args.workers} workers "
            "(each would keep its own quotas and budgets); use 'sqlite', 'redis' or 'postgres'"
        )
    root = Path(config.server.state_dir)
    make_private_dir(root)
    lock = lock_state_dir(root)  # before any worker opens a database in the directory
    _create_secrets(StatePaths(root))
    host = args.host or config.server.host
    port = args.port if args.port is not None else config.server.port
    reserved: list[socket.socket] = []
    try:
        try:
            reserved.append(_reserve(host, port))
            if config.grpc.enabled:
                reserved.append(_reserve(config.grpc.host, config.grpc.port))
        except OSError as e:
            raise ConfigError(f"{args.config}: server: {e}") from None
        port = reserved[0].getsockname()[1]
        worker_args: dict[str, object] = {
            "config": str(args.config),
            "host": host,
            "port": port,
            "log_level": args.log_level,
            "max_concurrency": args.max_concurrency,
            "unsafe_no_defenses": args.unsafe_no_defenses,
            "state_dir": str(root),
        }
        log.info("supervisor: %d workers on %s:%d", args.workers, host, port)
        metrics_dir = tempfile.mkdtemp(prefix="bastion-metrics-")  # 0700, this run's only
        try:
            return Supervisor(
                args.workers,
                worker_args,
                lock.fileno(),
                metrics_dir,
                heartbeat_timeout=config.server.worker_heartbeat_timeout_seconds,
            ).run()
        finally:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    finally:
        for sock in reserved:
            sock.close()
        lock.release()


def _create_secrets(paths: StatePaths) -> None:
    """The state directory's keys, made once here: workers starting together would race to create them."""
    from bastion.assembly import load_or_create_secret
    from bastion.audit.chain import load_or_create_audit_key
    from bastion.tokens import load_or_create_signing_key

    load_or_create_audit_key(paths.audit_key)
    load_or_create_signing_key(paths.token_key)
    load_or_create_secret(paths.hmac_key)


def _die_with_parent(supervisor: int) -> None:
    """Ask the kernel for SIGTERM when the supervisor dies (Linux); a supervisor already gone: exit."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the supervisor's SIGTERM still stops the worker
        pass
    if os.getppid() != supervisor:
        sys.exit(0)


def _heartbeat(fd: int) -> Callable[[], None]:
    """The worker's beat: one byte on the supervisor's pipe at most every `_BEAT_EVERY` seconds.
    Never blocks the loop: a full pipe (a supervisor that is not reading) or a closed one is skipped."""
    os.set_blocking(fd, False)
    last = 0.0

    def beat() -> None:
        nonlocal last
        now = time.monotonic()
        if now - last < _BEAT_EVERY:
            return
        last = now
        with contextlib.suppress(BlockingIOError, BrokenPipeError):
            os.write(fd, b".")

    return beat


def worker_main(argv: list[str]) -> int:
    """A worker: `python -m bastion.workers '<json args>' <lock fd>`, started by `Supervisor`."""
    from bastion import cli
    from bastion.statedir import StateDirLock

    spec = json.loads(argv[0])
    lock_fd = int(argv[1])
    _die_with_parent(int(spec["supervisor"]))
    os.umask(0o077)
    lock = StateDirLock(Path(spec["state_dir"]), lock_fd, owner=False)
    host, port = str(spec["host"]), int(spec["port"])
    args = argparse.Namespace(
        config=Path(spec["config"]),
        host=host,
        port=port,
        log_level=spec["log_level"],
        max_concurrency=spec["max_concurrency"],
        unsafe_no_defenses=spec["unsafe_no_defenses"],
        workers=1,
    )
    sock = worker_socket(host, port)
    beat = _heartbeat(int(spec["heartbeat_fd"]))
    args.func = lambda a: cli.run_server(a, sock=sock, state_lock=lock, heartbeat=beat)
    return cli._run(args)  # the CLI's own error handling and exit codes


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
