"""Shared setup for bench/redteam_scale2 scripts: a real `bastion serve --workers N` deployment."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tests.helpers import BASTION, create_key, start_server, write_test_deployment, run_cli  # noqa

PG = "postgresql://postgres@127.0.0.1:5432/postgres"


def deploy(root: Path, *, pg_table: str | None = None, extra: str = ""):
    root.mkdir(parents=True, exist_ok=True)
    audit = ""
    if pg_table:
        audit = f'sink = "postgres"\npostgres_dsn = "{PG}"\npostgres_table = "{pg_table}"\n'
    config, build = write_test_deployment(root, extra=extra)
    text = config.read_text()
    if audit:
        text = text.replace("[audit]\n", "[audit]\n" + audit, 1)
    config.write_text(text)
    return config, build


def infer_body(n=1):
    return {"inputs": [{"name": "input", "datatype": "FP64", "shape": [n, 30], "data": [0.1] * (30 * n)}]}


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(x) for x in out]
