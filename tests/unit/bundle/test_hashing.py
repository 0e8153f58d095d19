from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest

from bastion.bundle.hashing import Progress, hash_files, list_files


def test_parallel_hashes_match_hashlib(tmp_path: Path) -> None:
    for i in range(5):
        (tmp_path / f"f{i}.bin").write_bytes(os.urandom(100_000 * (i + 1)))
    names = list_files(tmp_path, exclude=set())
    got = hash_files(tmp_path, names, progress=False)
    assert got == {n: hashlib.sha256((tmp_path / n).read_bytes()).hexdigest() for n in names}


def test_symlinks_are_refused(tmp_path: Path) -> None:
    (tmp_path / "real").write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(ValueError, match="symbolic links are not allowed"):
        list_files(tmp_path, exclude=set())


def test_progress_bar_draws_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    bar = Progress(4 << 20, "hashing model", enabled=True)
    for _ in range(4):
        bar.advance(1 << 20)
    bar.finish()
    text = err.getvalue()
    assert "hashing model [" in text and "100% of 4 MiB" in text and text.endswith("\n")
    quiet = Progress(10, "x", enabled=False)
    quiet.advance(10)
    assert "x [" not in err.getvalue()
