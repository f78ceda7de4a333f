"""Worker names unique on this machine.

Celery calls every worker ``celery@<host>`` unless told otherwise, so two workers on one
machine shared a registry row (and one stopping marked both offline). ``svdfarm worker`` names
itself ``worker<N>@<host>`` with the lowest N no other running worker here holds, and refuses
a ``--hostname`` another worker here holds.

A running worker holds an exclusive lock (``flock``) on a file named for it, in a folder every
user of the machine shares. The lock goes with the process however it ends, so a crashed
worker's name is free again at once, where a registry row would look alive for three
heartbeats.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

#: Where the lock files live: shared by every user, like the temporary folder it is in.
LOCK_DIR = Path(tempfile.gettempdir()) / "svdfarm-workers"
#: How many default names (worker1 ... worker<MAX>) are tried before giving up.
MAX_DEFAULT = 1000


class NameTaken(RuntimeError):
    """Another worker on this machine holds the name asked for."""


@dataclass
class WorkerName:
    """A worker's name and the lock that keeps it this process's (None: no lock folder)."""

    name: str
    lock: IO[bytes] | None = None
    #: The lock file, removed when the name is given back (a killed worker's stays, unlocked).
    path: Path | None = None

    def release(self) -> None:
        """Give the name back and remove its file (the process's end frees the name too)."""
        if self.lock is not None:
            if self.path is not None:
                with contextlib.suppress(OSError):
                    self.path.unlink()  # still locked: whoever opened it meanwhile retries
            self.lock.close()
            self.lock = None


def expand(hostname: str) -> str:
    """A ``--hostname`` as Celery will spell it: ``%h`` expanded, ``@<host>`` added."""
    from celery.utils.nodenames import default_nodename, host_format

    return str(host_format(default_nodename(hostname)))


def claim_worker_name(requested: str, lock_dir: Path = LOCK_DIR) -> WorkerName:
    """The name this process's worker takes: ``requested`` (expanded), or the first free
    ``worker<N>@<host>``. Raises :class:`NameTaken` when another running worker on this
    machine holds ``requested``."""
    try:
        _ensure_shared_dir(lock_dir)
    except OSError:
        # No shared folder to coordinate in: a name no other process can have.
        return WorkerName(expand(requested) if requested else expand(f"worker-{os.getpid()}@%h"))
    if requested:
        name = expand(requested)
        lock = _try_lock(lock_dir, name)
        if lock is None:
            holder = _holder(lock_dir, name)
            raise NameTaken(
                f"another svdfarm worker on this machine{holder} is already named {name}; "
                "give this one its own name with --hostname, e.g. --hostname "
                "worker2@%h (or leave --hostname out: each worker then takes the first free "
                "worker<N>@<host>)"
            )
        return WorkerName(name, lock, _lock_path(lock_dir, name))
    for number in range(1, MAX_DEFAULT + 1):
        name = expand(f"worker{number}@%h")
        lock = _try_lock(lock_dir, name)
        if lock is not None:
            return WorkerName(name, lock, _lock_path(lock_dir, name))
    raise NameTaken(f"{MAX_DEFAULT} workers run on this machine already; give --hostname")


def _ensure_shared_dir(lock_dir: Path) -> None:
    """Create the lock folder, writable by every user and sticky (as /tmp is)."""
    if not lock_dir.is_dir():
        lock_dir.mkdir(parents=True, exist_ok=True)
        try:
            lock_dir.chmod(0o1777)
        except PermissionError:  # another user made it a moment ago
            pass


def _lock_path(lock_dir: Path, name: str) -> Path:
    """The lock file of a worker name."""
    return lock_dir / (re.sub(r"[^A-Za-z0-9._@-]", "_", name) + ".lock")


def _try_lock(lock_dir: Path, name: str) -> IO[bytes] | None:
    """The open, locked file of ``name``; None when another process holds it."""
    path = _lock_path(lock_dir, name)
    while True:
        try:
            handle: IO[bytes] = open(path, "a+b")  # held open for the life of the process
        except PermissionError:  # another user's file: reading is enough to lock it
            handle = open(path, "rb")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return None
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(handle.fileno()).st_ino:
            break
        handle.close()  # its holder removed this file as it let go: lock the new one
    if handle.writable():
        with contextlib.suppress(OSError):  # readable by every user, so they can lock it
            os.chmod(path, 0o644)
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n".encode())
        handle.flush()
    return handle


def _holder(lock_dir: Path, name: str) -> str:
    """`` (pid 1234)`` when the holder of ``name`` wrote its process id, else nothing."""
    try:
        pid = _lock_path(lock_dir, name).read_text().strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""
