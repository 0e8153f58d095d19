"""The environment lock: Python, platform and the exact versions of what a runtime imports."""

from __future__ import annotations

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
        packages={name: metadata.version(name) for name in RUNTIME_PACKAGES[runtime]},
    )


def differences(locked: Environment, here: Environment) -> list[tuple[str, str, str]]:
    """(what, locked value, value here) for each difference; packages by name, plus python and platform."""
    found = []
    if locked.python != here.python:
        found.append(("python", locked.python, here.python))
    if locked.platform != here.platform:
        found.append(("platform", locked.platform, here.platform))
    for name, version in sorted(locked.packages.items()):
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = "not installed"
        if installed != version:
            found.append((name, version, installed))
    return found
