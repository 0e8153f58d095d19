"""Shared test helpers: build real model directories and policy files, start the real server."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bastion.context import RequestContext
from bastion.demo import build_demo, write_skops_model
from bastion.errors import PayloadTooLarge
from bastion.manifest import InputSpec, OutputSpec
from bastion.routes import ROUTE_ACTIONS, Route

BASTION = [sys.executable, "-m", "bastion.cli"]

TEST_ROLES = """
[roles.analyst]
rate = 50
burst = 100
daily_quota = 100000
grants = [
  { models = ["breast-cancer", "breast-cancer-skops"], actions = ["infer", "metadata"], output = "label" },
  { models = ["loan"], actions = ["infer", "metadata"], output = "probabilities" },
]

[roles.admin]
rate = 500
burst = 1000
daily_quota = 1000000
grants = [
  { models = ["*"], actions = ["infer", "metadata", "admin"], output = "probabilities", sensitive_inputs = true },
]

# Has a grant, but not on the breast-cancer models.
[roles.outsider]
rate = 50
burst = 100
grants = [ { models = ["loan"], actions = ["metadata"] } ]

# A tight bucket for the rate-limit tests.
[roles.tight]
rate = 0.5
burst = 3
grants = [ { models = ["breast-cancer"], actions = ["infer", "metadata"] } ]

# One role per output policy.
[roles.topk]
rate = 1000
burst = 1000
grants = [ { models = ["breast-cancer"], actions = ["infer", "metadata"], output = "top_k", top_k = 2 } ]

# Labels from every model: on the regressor, a policy made for classes.
[roles.labels]
rate = 1000
burst = 1000
grants = [ { models = ["*"], actions = ["infer", "metadata"] } ]

[roles.rounded]
rate = 1000
burst = 1000
[[roles.rounded.grants]]
models = ["breast-cancer", "diabetes"]
actions = ["infer", "metadata"]
output = "rounded"
decimals = 1

[roles.rsig]
rate = 1000
burst = 1000
grants = [ { models = ["breast-cancer"], actions = ["infer", "metadata"], output = "reverse_sigmoid", beta = 0.6 } ]

[roles.dp]
rate = 1000
burst = 1000

[[roles.dp.grants]]
models = ["breast-cancer"]
actions = ["infer", "metadata"]
output = "dp_scores"
epsilon = 0.5
privacy_budget = 5.0

# The regressor's values with DP noise: epsilon 2 a row, 6 in all.
[roles.regdp]
rate = 1000
burst = 1000
[[roles.regdp.grants]]
models = ["diabetes"]
actions = ["infer", "metadata", "aggregate"]
output = "dp_scores"
epsilon = 2.0
privacy_budget = 6.0

[roles.agg]
rate = 1000
burst = 1000
[[roles.agg.grants]]
models = ["breast-cancer", "breast-cancer-skops"]
actions = ["aggregate"]
epsilon = 1.0
privacy_budget = 4.0

# Steady load from a second process: limits that never refuse.
[roles.loader]
rate = 100000
burst = 100000
daily_quota = 100000000
grants = [ { models = ["breast-cancer"], actions = ["infer"] } ]

# A tiny daily quota.
[roles.quota]
rate = 100
burst = 100
daily_quota = 2
grants = [ { models = ["breast-cancer"], actions = ["infer"] } ]
"""


def write_loan_model(model_dir: Path) -> None:
    """A small model with a sensitive categorical input, to test grants on sensitive inputs."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 3)).astype(np.float32)
    region = rng.integers(0, 3, size=(400, 1))
    y = ((x[:, 0] + 0.5 * region[:, 0]) > 0.5).astype(int)
    estimator = LogisticRegression().fit(np.hstack([x, region]), y)
    inputs = [
        InputSpec(name="income", datatype="FP32", shape=[-1, 3], min=-10.0, max=10.0),
        InputSpec(name="region", datatype="INT64", shape=[-1, 1], categories=[0, 1, 2], sensitive=True),
    ]
    write_skops_model(model_dir, estimator, inputs, OutputSpec(classes=["approve", "decline"]), "loan")


# The shared suite sends hundreds of bad credentials from one address and checks that each request has
# its own audit record: no failed-auth throttling or counting there. Tests of those pass their own.
UNTHROTTLED_FAILED_AUTH = (
    "failed_auth_burst = 1000000\n"
    "refusals_audited_per_window = 1000000\n"
    "refusals_audited_total_per_window = 1000000\n"
)


def write_test_deployment(
    root: Path, *, port: int = 0, extra: str = "", failed_auth: str = UNTHROTTLED_FAILED_AUTH
) -> tuple[Path, Any]:
    """`failed_auth`: lines added to the [limits] section."""
    build = build_demo(root, port=port, llm=False)
    write_loan_model(root / "models" / "loan")
    build.publish(root / "models" / "loan")
    text = build.config_path.read_text()
    head = text[: text.index("# Analysts may ask")]
    head = head.replace("checkpoint_every_records = 1000", "checkpoint_every_records = 25")
    head = head.replace("[limits]\n", "[limits]\n" + failed_auth, 1)
    loan = '[[models]]\npath = "bundles/loan-1"\ntrusted_keys = ["keys/release.pub"]\n\n'
    head = head.replace(
        'path = "bundles/breast-cancer-1"\ntrusted_keys = ["keys/release.pub"]\n',
        'path = "bundles/breast-cancer-1"\ntrusted_keys = ["keys/release.pub"]\naggregates = true\n',
    )
    build.config_path.write_text(head + loan + extra + TEST_ROLES)
    return build.config_path, build


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_cli(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*BASTION, *map(str, args)], capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"bastion {args} failed: {result.stderr}")
    return result


def create_key(config: Path, role: str, *extra: str) -> str:
    return run_cli(
        "keys", "create", "--config", config, "--name", f"test-{role}", "--role", role, *extra
    ).stdout.strip()


@dataclass
class RunningServer:
    base_url: str
    config: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    request_ids: list[str] = field(default_factory=list)

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(
            base_url=self.base_url, headers=headers, timeout=30, event_hooks={"response": [self._remember]}
        )

    def _remember(self, response: httpx.Response) -> None:
        rid = response.headers.get("x-request-id")
        if rid:
            self.request_ids.append(rid)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_server(config: Path, log_path: Path, *extra: str) -> RunningServer:
    """A real `bastion serve` on a free loopback port, once it answers /v2/health/live. Tests run
    in 2 xdist workers: a port another process took between `free_port` and the bind is retried."""
    for _ in range(3):
        try:
            return _start_server(config, log_path, *extra)
        except _PortTaken:
            continue
    raise AssertionError("no free port after 3 tries")


class _PortTaken(Exception):
    pass


def _start_server(config: Path, log_path: Path, *extra: str) -> RunningServer:
    port = free_port()
    log = log_path.open("wb")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [*BASTION, "serve", "--config", str(config), "--port", str(port), *extra],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    server = RunningServer(f"http://127.0.0.1:{port}", config, process, log_path)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            text = log_path.read_text()
            if "address already in use" in text.lower():
                raise _PortTaken
            raise AssertionError(f"server exited: {text}")
        try:
            if httpx.get(f"{server.base_url}/v2/health/live", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.1)
    server.stop()
    raise AssertionError("server did not start in 60 s")


REDIS_URL = os.environ.get("BASTION_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def redis_prefix() -> str:
    """A namespace of keys no other test (or run) shares; `drop_redis_keys` removes it."""
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as e:
        # Not a skip: the Redis backend is a feature, and its tests must run (.ci/run starts Redis).
        raise AssertionError(f"the Redis tests need a Redis server at {REDIS_URL}: {e}") from None
    return f"bastion-test-{secrets.token_hex(6)}:"


def drop_redis_keys(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


POSTGRES_DSN = os.environ.get("BASTION_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")


def postgres_table() -> str:
    """A ledger table no other test (or run) shares; `drop_postgres_table` removes it."""
    import psycopg

    try:
        psycopg.connect(POSTGRES_DSN, connect_timeout=2).close()
    except psycopg.Error as e:
        raise AssertionError(f"the PostgreSQL tests need a server at {POSTGRES_DSN}: {e}") from None
    return f"bastion_test_{secrets.token_hex(6)}"


def drop_postgres_table(table: str) -> None:
    """Drop the table and the ones named after it (`<table>_records`, `<table>_records_counters`...)."""
    import psycopg

    with psycopg.connect(POSTGRES_DSN) as conn:
        rows = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() AND "
            "(tablename = %s OR starts_with(tablename, %s))",
            (table, f"{table}_"),
        ).fetchall()
        for (name,) in rows:
            conn.execute(f'DROP TABLE IF EXISTS "{name}"')


@contextlib.contextmanager
def two_replicas(
    root: Path, backend: str, roles: tuple[str, ...] = ()
) -> Iterator[tuple[list[RunningServer], Path, Any, dict[str, str]]]:
    """Two real servers sharing `backend` ("redis" or "postgres", in a fresh namespace dropped
    afterwards), each with its own state directory and audit log: (servers, the first's policy file,
    the demo build, a key per role in `roles`, created through the shared backend). The second
    state directory is a copy of the first, so both have the same token signing key (as a replica
    would get it, mounted from a secret)."""
    from bastion.tokens import load_or_create_signing_key

    if backend == "redis":
        namespace = redis_prefix()
        state = f'backend = "redis"\nredis_url = "{REDIS_URL}"\nredis_prefix = "{namespace}"'
    else:
        namespace = postgres_table()
        state = f'backend = "postgres"\npostgres_dsn = "{POSTGRES_DSN}"\npostgres_table = "{namespace}"'
    config, build = write_test_deployment(root)
    text = config.read_text().replace('backend = "sqlite"', state)
    config.write_text(text)
    servers: list[RunningServer] = []
    try:
        keys = {role: create_key(config, role) for role in roles}
        load_or_create_signing_key(root / "state" / "token_signing.jwk")
        shutil.copytree(root / "state", root / "state-2")
        config_2 = root / "bastion-2.toml"
        config_2.write_text(text.replace('state_dir = "state"', 'state_dir = "state-2"'))
        servers.append(start_server(config, root / "a.log"))
        servers.append(start_server(config_2, root / "b.log"))
        yield servers, config, build, keys
    finally:
        for server in servers:
            server.stop()
        if backend == "redis":
            drop_redis_keys(namespace)
        else:
            drop_postgres_table(namespace)


def core_context(
    route: Route, credentials: str | None, body: bytes | dict[str, Any] | None = None, **fields: Any
) -> RequestContext:
    """A request as a transport hands it to `Bastion.handle`, for the in-process tests: `body` (bytes,
    or a JSON object) read under the stage's cap as a transport reads it (413 past it); `fields` any
    other transport field (`model_name`, `resource_id`, `traceparent`...)."""
    raw = json.dumps(body).encode() if isinstance(body, dict) else (body or b"")

    async def read_body(limit: int) -> bytes:
        if len(raw) > limit:
            raise PayloadTooLarge(f"body larger than {limit} bytes")
        return raw

    fields.setdefault("client", "127.0.0.1")
    return RequestContext(
        request_id=f"t{time.perf_counter_ns()}",
        action=ROUTE_ACTIONS[route],
        now=time.time(),
        credentials=credentials,
        read_body=read_body,
        **fields,
    )


@contextlib.contextmanager
def llm_upstream() -> Iterator[tuple[str, str]]:
    """A real OpenAI-compatible upstream: xllamacpp's server with SmolLM2 in its own process
    (tests/e2e/llm_upstream_server.py), holding a random API key. Yields (its /v1 URL, the key)."""
    key = "up-" + secrets.token_urlsafe(24)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "UPSTREAM_API_KEY": key, "PYTHONPATH": str(root / "src")}
    launcher = root / "tests" / "e2e" / "llm_upstream_server.py"
    process = subprocess.Popen(
        [sys.executable, str(launcher), "0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # the model loads in about half a second
        assert line.startswith("READY http://127.0.0.1:"), line
        yield line.split()[1] + "/v1", key
    finally:
        process.terminate()
        process.wait(10)
