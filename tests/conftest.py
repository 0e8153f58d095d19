from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import RunningServer, create_key, start_server, write_test_deployment


@dataclass
class Deployment:
    """The real server with its keys, and every secret the tests used (for the leak scan)."""

    server: RunningServer
    config: Path
    root: Path
    build: Any
    keys: dict[str, str]
    secrets: set[str] = field(default_factory=set)
    raw_values: set[str] = field(default_factory=set)


_SERVICES = {"redis", "postgres"}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the marks (it turns them into nodeid suffixes)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test on the shared `deployment` runs in one xdist worker, in file order: the last file
    (test_zz_audit_and_leaks) checks that every request the others made is in that server's audit
    log, and stops it. Other tests spread over the workers by file (a module's servers start once).

    A test run against Redis or PostgreSQL (a "redis" or "postgres" parameter) is marked `services`:
    it talks to a server over a socket, so `make unit` leaves it to `make test`."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and _SERVICES & {str(v) for v in callspec.params.values()}:
            item.add_marker(pytest.mark.services)
        shared = "deployment" in getattr(item, "fixturenames", ())
        item.add_marker(pytest.mark.xdist_group("deployment" if shared else item.nodeid.split("::")[0]))


@pytest.fixture(scope="session")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("deployment")
    config, build = write_test_deployment(root)
    keys = {role: create_key(config, role) for role in ("analyst", "admin", "outsider", "tight", "quota")}
    server = start_server(config, root / "server.log")
    dep = Deployment(server, config, root, build, keys, secrets=set(keys.values()))
    yield dep
    server.stop()
