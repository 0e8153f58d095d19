"""The core knows no transport: no stage (nor the core, nor what it imports) imports bastion.http."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import bastion
import bastion.stages

SRC = Path(bastion.__file__).parent
# Transport-neutral modules: the stages, and the core they run in.
CORE = ["bastion.context", "bastion.errors", "bastion.routes", "bastion.openapi", "bastion.service"]


def _stage_modules() -> list[str]:
    return [
        "bastion.stages",
        *(m.name for m in pkgutil.iter_modules(bastion.stages.__path__, "bastion.stages.")),
    ]


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at its top or inside a function (a lazy import counts too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _file(module: str) -> Path:
    relative = Path(*module.split(".")[1:])
    package = SRC / relative / "__init__.py"
    return package if package.exists() else (SRC / relative).with_suffix(".py")


def test_no_stage_or_core_module_names_bastion_http() -> None:
    modules = _stage_modules() + CORE
    assert len(modules) > 10
    offending = {
        m: sorted(i for i in _imports(_file(m)) if i == "bastion.http" or i.startswith("bastion.http."))
        for m in modules
    }
    assert {m: i for m, i in offending.items() if i} == {}


@pytest.mark.slow
def test_importing_every_stage_and_the_core_loads_no_http_module() -> None:
    # A fresh interpreter: what the stages pull in transitively, not what this test session loaded.
    code = (
        "import importlib, json, sys\n"
        f"for m in {json.dumps(_stage_modules() + CORE)}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('bastion.http'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == []


def test_the_check_sees_a_lazy_import(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from bastion.http.openapi import OPENAPI\n    return OPENAPI\n")
    assert "bastion.http.openapi" in _imports(probe)
