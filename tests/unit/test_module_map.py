"""The README's module map ("Development") names every module of the package (issue 10: "the
module map names every module"); nothing else kept it so, and it drifted (red team issue 10, F3)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "bastion"


def _module_map() -> str:
    """The code block of the README's "Development" section that starts with `src/bastion/`."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Development", 1)[1]
    block = section.split("```\nsrc/bastion/\n", 1)[1].split("```", 1)[0]
    return block.split("\ntests/unit/", 1)[0]


def _entries(block: str) -> list[str]:
    """One string per entry: a line indented by two spaces and its continuation lines."""
    entries: list[str] = []
    for line in block.splitlines():
        if re.match(r"^  \S", line) or not entries:
            entries.append(line)
        else:
            entries[-1] += " " + line
    return entries


def _names(text: str, stem: str) -> bool:
    words = re.findall(r"[A-Za-z0-9_*]+(?:\.py)?", text)
    for word in words:
        word = word.removesuffix(".py")
        if word == stem or (word.endswith("*") and stem.startswith(word[:-1])):
            return True
    return False


def unnamed_modules() -> list[str]:
    """Modules (as paths under src/bastion) the map does not name. A top-level module is named by
    its file name anywhere in the map; a package's module by its name in that package's entry."""
    block = _module_map()
    entries = _entries(block)
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if path.name == "__init__.py":
            continue
        if len(relative.parts) == 1:
            named = re.search(rf"(?<![\w/]){re.escape(path.name)}\b", block) is not None
        else:
            package = "/".join(relative.parts[:-1]) + "/"
            named = any(
                _names(entry, path.stem)
                for entry in entries
                if re.search(rf"(?:^|\s){re.escape(package)}(?:\s|$)", entry)
            )
        if not named:
            missing.append(str(relative))
    return missing


def test_the_readme_module_map_names_every_module() -> None:
    assert unnamed_modules() == []
