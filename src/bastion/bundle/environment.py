"""The environment lock: Python, platform and the exact versions of what a runtime imports."""

from __future__ import annotations

import functools
import platform
from importlib import metadata

from bastion.bundle.format import Environment

RUNTIME_PACKAGES = {
    "onnx": ["onnxruntime", "numpy"],
    "sklearn": ["scikit-learn", "scipy", "numpy", "skops"],
}


def current_environment(runtime: str) -> Environment:
    return Environment(
        python=platform.python_version(),
        platform=f"{platform.system()}-{platform.machine()}",
        packages={name: _installed(name) for name in RUNTIME_PACKAGES[runtime]},
    )


@functools.cache
def _installed(name: str) -> str:
    """The installed version of a distribution, read once a process (each read parses its METADATA
    file: ~2 ms, on every model load and reload otherwise); "not installed" if absent."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def differences(locked: Environment, here: Environment) -> list[tuple[str, str, str]]:
    """(what, locked value, value here) for each difference; packages by name, plus python and platform."""
    found = []
    if locked.python != here.python:
        found.append(("python", locked.python, here.python))
    if locked.platform != here.platform:
        found.append(("platform", locked.platform, here.platform))
    for name, version in sorted(locked.packages.items()):
        installed = _installed(name)
        if installed != version:
            found.append((name, version, installed))
    return found
