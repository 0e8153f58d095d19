"""File hashing for bundles: SHA-256, files in parallel, a progress bar on a terminal."""

from __future__ import annotations

import hashlib
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

_CHUNK = 4 << 20


class Progress:
    """A one-line progress bar on stderr, shown only when stderr is a terminal."""

    def __init__(self, total: int, label: str, *, enabled: bool | None = None) -> None:
        self.total = max(total, 1)
        self.label = label
        self.done = 0
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._lock = threading.Lock()
        self._shown = -1

    def advance(self, n: int) -> None:
        if not self.enabled:
            return
        with self._lock:
            self.done += n
            pct = self.done * 100 // self.total
            if pct != self._shown:
                self._shown = pct
                bar = "#" * (pct * 30 // 100)
                sys.stderr.write(f"\r{self.label} [{bar:<30}] {pct:3d}% of {self.total / 2**20:,.0f} MiB")
                sys.stderr.flush()

    def finish(self) -> None:
        if self.enabled and self._shown >= 0:
            sys.stderr.write("\n")


def sha256_file(path: Path, progress: Progress | None = None) -> str:
    h = hashlib.sha256()
    with path.open("rb", buffering=0) as f:
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])  # hashlib releases the GIL on large updates: files hash in parallel
            if progress is not None:
                progress.advance(n)
    return h.hexdigest()


def hash_files(
    root: Path, names: list[str], *, label: str = "hashing", progress: bool | None = None
) -> dict[str, str]:
    total = sum((root / n).stat().st_size for n in names)
    bar = Progress(total, label, enabled=progress)
    workers = min(len(names), os.cpu_count() or 1) or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        digests = dict(zip(names, pool.map(lambda n: sha256_file(root / n, bar), names), strict=True))
    bar.finish()
    return digests


def list_files(root: Path, *, exclude: set[str]) -> list[str]:
    """Every regular file below root (POSIX relative paths), sorted; symlinks are refused."""
    names = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            raise ValueError(f"{path}: symbolic links are not allowed in a bundle")
        if path.is_file() and rel not in exclude:
            names.append(rel)
    return names
