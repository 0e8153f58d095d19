"""Modules of src/bastion that the README's module map ("Development") does not name.

.venv/bin/python bench/redteam_issue10/module_map.py
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tests.unit.test_module_map import unnamed_modules  # noqa: E402

missing = unnamed_modules()
print("\n".join(missing) or "every module is named")
