"""One server per state directory: an exclusive `flock` on `server.lock` inside it, held for the
server's lifetime, with the holder's PID written into the file.

Two servers on one directory would each keep their own idea of the audit chain's head in memory;
the first to commit after the other wrote gets a duplicate sequence number and fails closed for
good. The lock is taken before any database in the directory is opened, so a second server
touches nothing. CLI admin commands (`keys`, `audit verify`, `models release`) do not take it:
their databases are shared by design.

The lock file is never removed: unlinking it while another process opens it would let two
processes hold locks on two different files. The kernel drops the lock when the process dies,
so a crashed server leaves nothing to clean up.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

from bastion.errors import StateDirLocked

LOCK_NAME = "server.lock"


@dataclass(frozen=True, slots=True)
class StatePaths:
    root: Path

    @property
    def keys(self) -> Path:
        return self.root / "keys.db"

    @property
    def limits(self) -> Path:
        return self.root / "limits.db"

    @property
    def audit(self) -> Path:
        return self.root / "audit.db"

    @property
    def isolation(self) -> Path:
        return self.root / "isolation.db"

    @property
    def incidents(self) -> Path:
        return self.root / "incidents.db"

    @property
    def measures(self) -> Path:
        return self.root / "containment.db"

    @property
    def audit_key(self) -> Path:
        return self.root / "audit_signing.key"

    @property
    def audit_public_key(self) -> Path:
        return self.root / "audit_signing.pub"

    @property
    def token_key(self) -> Path:
        return self.root / "token_signing.jwk"

    @property
    def hmac_key(self) -> Path:
        return self.root / "payload_hmac.key"


# Everything in a state directory holds keys, records or budgets: owner-only, whatever the umask of the
# process that creates it (the CLI sets 0o077 too; a library user may not).
PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def make_private_dir(path: Path) -> None:
    """Create directory `path` (and missing parents) with mode 0700; an existing one is made 0700."""
    path.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o777 != PRIVATE_DIR:  # chmod by another user fails even as a no-op
        path.chmod(PRIVATE_DIR)


def make_private_sqlite(path: Path) -> None:
    """Before SQLite opens `path`: its directory 0700, the database file created (or made) 0600, and any
    -wal/-shm/-journal left by an earlier run made 0600. SQLite gives the files it creates beside a
    database the database's own mode, so they are owner-only from their first byte."""
    make_private_dir(path.parent)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE))
    for suffix in ("", "-wal", "-shm", "-journal"):
        # Another process (a worker starting beside this one) may delete a -journal or -wal between
        # a look and a chmod: a file gone is a file with nothing to protect.
        with contextlib.suppress(FileNotFoundError):
            path.with_name(path.name + suffix).chmod(PRIVATE_FILE)


class StateDirLock:
    """An acquired lock; `release()` (idempotent) gives it back.

    The flock belongs to the open file, not to a process: a descriptor inherited by a child process
    (`bastion serve --workers`) holds the same lock, which the kernel drops only when the last
    process holding it closes it or dies."""

    def __init__(self, root: Path, fd: int, *, owner: bool = True) -> None:
        self.root = root
        self._fd: int | None = fd
        # A worker of `bastion serve --workers` shares the supervisor's lock through an inherited
        # descriptor (one open file, one flock): closing its copy must not erase the supervisor's PID.
        self._owner = owner

    @property
    def held(self) -> bool:
        return self._fd is not None

    def fileno(self) -> int:
        """The lock's descriptor (for a child process to inherit). Raises ValueError once released."""
        if self._fd is None:
            raise ValueError("state directory lock released")
        return self._fd

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if self._owner:
                os.ftruncate(fd, 0)  # no stale PID for the next reader
        finally:
            os.close(fd)  # closing the descriptor drops the flock


def lock_state_dir(root: Path) -> StateDirLock:
    """Take the directory's lock without waiting.

    Raises StateDirLocked naming the directory and the PID that holds it (or "unknown" when the
    holder has not written it yet).
    """
    path = root / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_pid(fd)
        os.close(fd)
        raise StateDirLocked(
            f"{root}: state directory in use by another bastion server (pid {holder or 'unknown'}); "
            "stop that server or give this one its own server.state_dir",
            pid=holder,
        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return StateDirLock(root, fd)


def holder_pid(root: Path) -> int | None:
    """The PID of the server holding `root`, or None when no server holds it (the lock is free)."""
    path = root / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd) or -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None
